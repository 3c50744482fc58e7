"""Which family a base model is: from a diffusers folder, a transformers folder, a hub id or one checkpoint file.

    detect_family("/models/sdxl-base")          # "sdxl" (asks the family registry, lora_studio/families.py)
    resolve_family("auto", base_model)          # the family to train, checked against the config's
    info = family_info("/models/sdxl-base")     # FamilyInfo: family, name, prediction type, resolution, presets
    info.recommended_preset(gpu_memory_gb=16)   # "sdxl_16gb"

Files that are not a base model LoRA Studio trains (an SDXL refiner, a LoRA file, bare language-model weights,
a diffusers pipeline of another kind) get one ``ModelLoadError`` sentence that says what to do.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from ..families import FAMILIES, get_family

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def family_name(family: str) -> str:
    return FAMILIES[family].name if family in FAMILIES else family


def is_local(base_model: str) -> bool:
    return os.path.isabs(base_model) or base_model.startswith((".", "~")) or Path(base_model).exists()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _trained_names() -> str:
    return ", ".join(f.name for f in FAMILIES.values())


def _family_from_folder(folder: Path) -> str | None:
    index = _read_json(folder / "model_index.json")
    if index:
        return _family_from_index(folder, index)
    config = _read_json(folder / "config.json")
    if config.get("architectures") or config.get("model_type"):
        archs = " ".join(config.get("architectures") or [])
        if "CausalLM" in archs or "LMHead" in archs or config.get("model_type") in _causal_lm_types():
            return "llm"
    return None


def _family_from_index(folder: Path, index: dict[str, Any]) -> str:
    """The family whose rule matches a diffusers ``model_index.json``."""
    cls = str(index.get("_class_name", ""))
    if "text_encoder_2" in index and (not index.get("text_encoder") or index.get("text_encoder") == [None, None]):
        raise ModelLoadError(f"'{folder.name}' is an SDXL refiner (it has no first text encoder); train LoRAs on an "
                             "SDXL base model instead.")
    for family in FAMILIES.values():
        if family.matches_index is not None and family.matches_index(index, folder):
            return family.id
    raise ModelLoadError(f"'{folder.name}' is a {cls or 'diffusers'} model, which LoRA Studio does not train; it "
                         f"trains {_trained_names()}.")


def _causal_lm_types() -> set[str]:
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    except ImportError:  # pragma: no cover
        return {"llama", "mistral", "qwen2", "gpt2", "phi3", "gemma"}


def _single_file_keys(path: Path) -> set[str] | None:
    """The tensor names of a checkpoint file (None when a .ckpt cannot be read without running its pickle)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                return set(fh.keys())
        except Exception as exc:
            raise ModelLoadError(f"'{path.name}' is not a readable .safetensors file ({first_line(exc)}).") from None
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # old pickles with training objects: leave the family to the config (SD1.x by default)
        return None
    state = state.get("state_dict", state) if isinstance(state, dict) else {}
    return {k for k in state if isinstance(k, str)}


def _family_from_single_file(path: Path) -> str:
    keys = _single_file_keys(path)
    if keys is None:
        return "sd15"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys) and \
            not any(k.startswith("conditioner.embedders.1") for k in keys):
        raise ModelLoadError(f"'{path.name}' is an SDXL refiner checkpoint; train LoRAs on an SDXL base model.")
    for family in FAMILIES.values():
        if family.matches_keys is not None and family.matches_keys(keys):
            return family.id
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_" in k for k in keys):
        raise ModelLoadError(f"'{path.name}' is a LoRA file, not a base model. Put it in init_lora to continue "
                             "training it, or pick a full checkpoint as base_model.")
    if any(k.startswith(("model.layers.", "model.embed_tokens", "transformer.h.")) for k in keys):
        raise ModelLoadError(f"'{path.name}' holds language-model weights; give the model's folder (with its "
                             "config.json and tokenizer) as base_model.")
    raise ModelLoadError(f"'{path.name}' is not a checkpoint of a family LoRA Studio trains ({_trained_names()}).")


def _hub_folder(base_model: str) -> Path | None:
    """The local snapshot of a hub id's configs, downloading them when the network allows."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(base_model, local_files_only=True, allow_patterns=["*.json", "*.txt"]))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return None
    try:
        return Path(snapshot_download(base_model, allow_patterns=["*.json", "*.txt"]))
    except Exception as exc:
        log.debug("hub lookup of %s failed: %s", base_model, exc)
        return None


def detect_family(base_model: str) -> str:
    """The family id of a folder, a checkpoint file or a hub id; ModelLoadError if it is not one we train."""
    if not base_model:
        raise ModelLoadError("No base model given: set base_model to a model folder, a hub id or a .safetensors file.")
    path = Path(base_model).expanduser()
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ModelLoadError(f"'{path}' is a {path.suffix or 'plain'} file; a base model is a diffusers folder, "
                                 "a hub id, or a .safetensors/.ckpt checkpoint.")
        return _family_from_single_file(path)
    if path.is_dir():
        family = _family_from_folder(path)
        if family is None:
            raise ModelLoadError(f"'{path}' is neither a diffusers model folder (no model_index.json) nor a "
                                 "transformers model folder (no config.json).")
        return family
    if is_local(base_model) or base_model.count("/") != 1:
        raise ModelLoadError(f"Base model '{base_model}' was not found: no such file or folder, and it is not a "
                             "hub id of the form owner/name.")
    folder = _hub_folder(base_model)
    if folder is None:
        raise ModelLoadError(f"Could not reach the model hub to get '{base_model}', and it is not in the local "
                             "cache. Connect to the internet once, or download the model and give its folder.")
    family = _family_from_folder(folder)
    if family is None:
        raise ModelLoadError(f"'{base_model}' on the hub is not a diffusers or transformers model.")
    return family


def resolve_family(config_family: str, base_model: str) -> str:
    """The family to train: the detected one, checked against the config's when that is not 'auto'."""
    detected = detect_family(base_model)
    if config_family not in ("auto", detected):
        # SD2 and SD1.5 share code; a mismatch between other families is a real error.
        if {config_family, detected} <= {"sd15", "sd2"}:
            return config_family
        raise ModelLoadError(f"model_family is '{config_family}' but '{base_model}' is a "
                             f"{family_name(detected)} ({detected}). Set model_family: auto or {detected}.")
    return detected


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


# --- what the family implies -------------------------------------------------------------------------------
@dataclass(frozen=True)
class FamilyInfo:
    family: str
    name: str
    prediction_type: str | None = None
    default_resolution: int | None = None
    presets: list[str] = field(default_factory=list)
    variant: str = ""  # which of the family's models (FLUX.2: "dev", "klein9b"; "" the first)

    def recommended_preset(self, gpu_memory_gb: float | None) -> str | None:
        from ..presets import recommend_preset

        preset = recommend_preset(gpu_memory_gb, get_family(self.family).preset_group, self.variant)
        return preset.name if preset else None


def prediction_type_of(base_model: str) -> str | None:
    """The scheduler's prediction type of a local diffusers folder (None when it cannot be read)."""
    path = Path(base_model).expanduser() / "scheduler" / "scheduler_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if "FlowMatch" in str(config.get("_class_name", "")):  # FLUX.1, Chroma: the model predicts the velocity
        return "flow_matching"
    return config.get("prediction_type") or "epsilon"


def family_info(base_model: str, family: str | None = None) -> FamilyInfo:
    """Detect (or take) the family of ``base_model`` and what it implies. ModelLoadError if unknown."""
    from ..presets import list_presets

    family = family if family and family != "auto" else detect_family(base_model)
    if family not in FAMILIES:
        raise ModelLoadError(f"'{family}' is not a model family LoRA Studio trains; known: {', '.join(FAMILIES)}.")
    entry = get_family(family)
    return FamilyInfo(family=family, name=entry.name,
                      prediction_type=prediction_type_of(base_model) if entry.is_image else None,
                      default_resolution=entry.default_resolution,
                      presets=[p.name for p in list_presets(entry.preset_group)],
                      variant=entry.variant_of(base_model))
