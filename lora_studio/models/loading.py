"""Find a base model and load it: a local diffusers folder, a hub id, or one A1111-style checkpoint file.

``detect_family`` tells SD1.x, SD2.x, SDXL and causal language models apart from their files, so the
family can pick defaults and presets. Every failure becomes one ``ModelLoadError`` sentence that says what to do.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

from ..errors import ModelLoadError

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
FAMILY_NAMES = {"sd15": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "SDXL", "flux": "FLUX.1",
                "chroma": "Chroma", "llm": "causal language model"}
FLOW_FAMILIES = ("flux", "chroma")  # transformer models loaded by models/flux_loading.py


def is_local(base_model: str) -> bool:
    return os.path.isabs(base_model) or base_model.startswith((".", "~")) or Path(base_model).exists()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


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
    """SD1.x, SD2.x or SDXL from a diffusers ``model_index.json`` (and the UNet/scheduler configs)."""
    cls = str(index.get("_class_name", ""))
    if cls in ("FluxPipeline", "ChromaPipeline"):
        return "chroma" if cls == "ChromaPipeline" else "flux"
    if "unet" not in index or "vae" not in index:  # SD3, Flux, PixArt (transformers), Kandinsky (MoVQ) ...
        raise ModelLoadError(f"'{folder.name}' is a {cls or 'diffusers'} model; LoRA Studio trains Stable "
                             "Diffusion 1.x, 2.x, SDXL, FLUX.1 and Chroma (and causal language models).")
    if "text_encoder_2" in index or "XL" in cls:
        if not index.get("text_encoder") or index.get("text_encoder") == [None, None]:
            raise ModelLoadError(f"'{folder.name}' is an SDXL refiner (it has no first text encoder); train "
                                 "LoRAs on an SDXL base model instead.")
        return "sdxl"
    unet = _read_json(folder / "unet" / "config.json")
    sched = _read_json(folder / "scheduler" / "scheduler_config.json")
    if unet.get("cross_attention_dim") == 1024 or sched.get("prediction_type") == "v_prediction":
        return "sd2"
    return "sd15"


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
            raise ModelLoadError(f"'{path.name}' is not a readable .safetensors file ({_first_line(exc)}).") from None
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
    if any(k.startswith("conditioner.embedders.1") for k in keys):
        return "sdxl"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise ModelLoadError(f"'{path.name}' is an SDXL refiner checkpoint; train LoRAs on an SDXL base model.")
    if any("cond_stage_model.model." in k for k in keys):
        return "sd2"
    from .flux_loading import detect_single_file

    flow = detect_single_file(keys)
    if flow and not any(".lora_" in k for k in keys):
        return flow
    if any(k.startswith("model.diffusion_model.joint_blocks") for k in keys):
        raise ModelLoadError(f"'{path.name}' is an SD3 checkpoint; LoRA Studio trains Stable Diffusion 1.x, 2.x, SDXL, "
                             "FLUX.1 and Chroma.")
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "sd15"
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_" in k for k in keys):
        raise ModelLoadError(f"'{path.name}' is a LoRA file, not a base model. Put it in init_lora to continue "
                             "training it, or pick a full checkpoint as base_model.")
    if any(k.startswith(("model.layers.", "model.embed_tokens", "transformer.h.")) for k in keys):
        raise ModelLoadError(f"'{path.name}' holds language-model weights; give the model's folder (with its "
                             "config.json and tokenizer) as base_model.")
    raise ModelLoadError(f"'{path.name}' does not look like a Stable Diffusion checkpoint (no UNet weights found).")


def _hub_folder(base_model: str) -> Path | None:
    """The local snapshot of a hub id, downloading it when the network allows."""
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
    """'sd15', 'sd2', 'sdxl', 'flux', 'chroma' or 'llm' for a folder, a checkpoint file or a hub id;
    ModelLoadError if unknown."""
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
        # SD2 and SD1.5 share code; a mismatch between an image family and an LLM is a real error.
        if {config_family, detected} <= {"sd15", "sd2"}:
            return config_family
        raise ModelLoadError(f"model_family is '{config_family}' but '{base_model}' is a "
                             f"{FAMILY_NAMES[detected]} ({detected}). Set model_family: auto or {detected}.")
    return detected


def load_diffusion_pipeline(base_model: str, family: str, *, torch_dtype=None, vae: str | None = None,
                            report: Callable[[str], None] | None = None, single_file_config: str | None = None):
    """Load a StableDiffusionPipeline / StableDiffusionXLPipeline from a folder, hub id or single file.

    ``report`` hears how a hub download of the model or the VAE is going (``models.download``). A single
    file takes its configs and tokenizer from ``single_file_config`` (a diffusers folder or hub id of the
    same family), else diffusers fetches the family's standard ones from the hub (once, then cached)."""
    from .download import download_progress

    if family in FLOW_FAMILIES:
        from .flux_loading import load_flux_pipeline

        return load_flux_pipeline(base_model, family, torch_dtype=torch_dtype, single_file_config=single_file_config,
                                  report=report)
    with download_progress(base_model, report):
        pipe = _load_pipeline(base_model, family, torch_dtype, single_file_config)
    if vae:
        with download_progress(vae, report):
            pipe.vae = load_vae(vae, torch_dtype)
    return pipe


def _load_pipeline(base_model: str, family: str, torch_dtype, single_file_config: str | None = None):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    kwargs: dict[str, Any] = {}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    if family != "sdxl":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    path = Path(base_model).expanduser()
    try:
        if path.is_file():
            if single_file_config:
                kwargs["config"] = str(Path(single_file_config).expanduser()) if is_local(single_file_config) \
                    else single_file_config
            pipe = cls.from_single_file(str(path), **kwargs)
        else:
            local_only = os.environ.get("HF_HUB_OFFLINE") == "1" and not path.is_dir()
            pipe = cls.from_pretrained(str(path) if path.is_dir() else base_model, local_files_only=local_only,
                                       **kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:
        hint = "Check that it is complete and of that family."
        if path.is_file() and not single_file_config:
            hint = (f"{hint} A single-file checkpoint takes its configs and tokenizer from the hub the first time "
                    "(a few MB): connect once, or set single_file_config to a diffusers folder of the same family.")
        raise ModelLoadError(f"Could not load the {FAMILY_NAMES.get(family, family)} model '{base_model}': "
                             f"{_first_line(exc)}. {hint}") from None
    return pipe


def load_vae(vae: str, torch_dtype=None):
    from diffusers import AutoencoderKL

    path = Path(vae).expanduser()
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    try:
        if path.is_file():
            return AutoencoderKL.from_single_file(str(path), **kwargs)
        if path.is_dir() and not (path / "config.json").exists() and (path / "vae").is_dir():
            path = path / "vae"
        return AutoencoderKL.from_pretrained(str(path) if path.exists() else vae, **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"Could not load the VAE '{vae}': {_first_line(exc)}.") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__
