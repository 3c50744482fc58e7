"""Load FLUX.1 and Chroma pipelines: a diffusers folder, a hub id, or one single-file checkpoint.

    pipe = load_flux_pipeline("black-forest-labs/FLUX.1-dev", "flux")
    pipe = load_flux_pipeline("flux1-dev.safetensors", "flux", single_file_config="/models/FLUX.1-dev")
    pipe = load_flux_pipeline(folder, "flux", transformer=quantized)      # a transformer loaded by the trainer
    model_render_defaults("flux1-schnell.safetensors", "flux")            # {"steps": 4, "cfg": 0.0}

A single file holds the transformer only (BFL/ComfyUI layout, ``models.flux_single_file``); the VAE, text
encoders, tokenizers, scheduler and configs come from ``single_file_config`` (a diffusers folder or hub id of
the same family), else from the released model on the hub (``DEFAULT_CONFIG``; FLUX.1-dev is gated: accept
its licence on the hub and log in once). Which family a file is, the registry's detection rules tell
(``families.py``); its entries point here for loading (``pipeline_loader``) and per-model render settings
(``render_defaults``). Every load holds the process-wide model-loading lock.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import ModelLoadError
from ..families import get_family
from .detect import first_line
from .load_lock import model_loading

DEFAULT_CONFIG = {"flux-dev": "black-forest-labs/FLUX.1-dev", "flux-schnell": "black-forest-labs/FLUX.1-schnell",
                  "chroma": "lodestones/Chroma1-HD"}
GUIDANCE_KEY = "guidance_in.in_layer.weight"  # a guidance-distilled FLUX.1 (dev and its fine-tunes) has it
SCHNELL_RENDER = {"steps": 4, "cfg": 0.0}      # FLUX.1-schnell: timestep-distilled, no guidance


def pipeline_class(family: str):
    return get_family(family).pipeline_class()


def transformer_class(family: str):
    from diffusers import ChromaTransformer2DModel, FluxTransformer2DModel

    return ChromaTransformer2DModel if family == "chroma" else FluxTransformer2DModel


# --- rendering defaults ---------------------------------------------------------------------------------
def _render(family: str, guided: bool) -> dict[str, float]:
    """A guidance-distilled FLUX.1 (dev) and Chroma: the registry's sample_steps / guidance_scale (28 / 3.5,
    35 / 5); FLUX.1 without guidance input (schnell): 4 / 0."""
    entry = get_family(family)
    if family == "flux" and not guided:
        return dict(SCHNELL_RENDER)
    return {"steps": entry.sample_steps, "cfg": entry.guidance_scale}


def render_defaults(family: str, transformer_config: Any) -> dict[str, Any]:
    """``guidance_scale`` and ``num_inference_steps`` for a loaded model: FLUX.1-dev 3.5 / 28, schnell 0 / 4,
    Chroma 5 / 35 (pipeline keyword arguments, for the trainer's sample images)."""
    found = _render(family, bool(getattr(transformer_config, "guidance_embeds", False)))
    return {"guidance_scale": found["cfg"], "num_inference_steps": found["steps"]}


def prompt_length(pipe: Any, requested: int = 512) -> int:
    """The prompt length to encode with: ``requested`` (``max_sequence_length``; the pipelines' default is 512), at
    most the long-prompt tokenizer's ``model_max_length`` (T5 for FLUX.1, Chroma and SD3, the third tokenizer there;
    Qwen3 or Mistral for FLUX.2): 512 for the released models, 32 for the miniatures, which were trained with that
    length (the transformer attends over every padding token, so the length matters)."""
    tokenizer = (getattr(pipe, "tokenizer_3", None) or getattr(pipe, "tokenizer_2", None)  # SD3's T5 is the third
                 or getattr(pipe, "tokenizer", None))
    limit = getattr(tokenizer, "model_max_length", None) or requested
    return int(min(requested, limit))


def model_render_defaults(base_model: str, family: str) -> dict[str, float]:
    """``{"steps", "cfg"}`` for a model's files (the registry's ``render_defaults`` hook for flux and chroma)."""
    return _render(family, family != "flux" or guidance_distilled(base_model))


def guidance_distilled(base_model: str) -> bool:
    """FLUX.1-dev and its fine-tunes have a guidance embedding; schnell has none (read from the files; a hub id
    whose config cannot be fetched is told by its name)."""
    path = Path(base_model).expanduser()
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            return any(k.endswith(GUIDANCE_KEY) for k in fh.keys())
    config = path / "transformer" / "config.json"
    if not config.is_file():
        try:
            from huggingface_hub import hf_hub_download

            config = Path(hf_hub_download(base_model, "transformer/config.json"))
        except Exception:
            return "schnell" not in base_model.lower()
    return bool(json.loads(config.read_text(encoding="utf-8")).get("guidance_embeds", False))


# --- loading --------------------------------------------------------------------------------------------
def _source(path: str) -> str:
    return str(Path(path).expanduser()) if Path(path).expanduser().exists() else path


def _local_only(source: str) -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1" and not Path(source).exists()


def config_source(path: Path, family: str, single_file_config: str | None) -> str:
    """Where a single file's configs, VAE and text encoders come from."""
    if single_file_config:
        return _source(single_file_config)
    if family == "chroma":
        return DEFAULT_CONFIG["chroma"]
    return DEFAULT_CONFIG["flux-dev" if guidance_distilled(str(path)) else "flux-schnell"]


def load_single_file_transformer(path: Path, family: str, source: str, torch_dtype=None):
    """The transformer of a single-file checkpoint, with ``source``'s transformer config for what the tensors
    do not tell (head size, rope axes)."""
    cls = transformer_class(family)
    if family == "chroma":  # diffusers' converter (it assumes the released width)
        return cls.from_single_file(str(path), config=source, subfolder="transformer", dtype=torch_dtype,
                                    local_files_only=_local_only(source))
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    from .flux_single_file import bfl_to_diffusers, transformer_config

    base = cls.load_config(source, subfolder="transformer", local_files_only=_local_only(source))
    state = load_file(str(path))
    config = transformer_config(state, base)
    state = bfl_to_diffusers(state)
    dtype = torch_dtype or next(iter(state.values())).dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):  # an fp8 checkpoint trains from bf16
        dtype = torch.bfloat16
    with init_empty_weights():
        model = cls.from_config(config)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return model


def load_flux_pipeline(base_model: str, family: str, *, torch_dtype=None, single_file_config: str | None = None,
                       transformer=None, without_transformer: bool = False,
                       report: Callable[[str], None] | None = None):
    """A ``FluxPipeline`` / ``ChromaPipeline``; ``transformer`` replaces the model's own (already loaded);
    ``without_transformer`` leaves it out (the trainer loads it after caching, quantized as asked)."""
    from .download import download_progress

    path = Path(base_model).expanduser()
    kwargs: dict[str, Any] = {"dtype": torch_dtype} if torch_dtype is not None else {}
    try:
        with model_loading(base_model), download_progress(base_model, report):
            if path.is_file():
                source = config_source(path, family, single_file_config)
                if transformer is None and not without_transformer:
                    transformer = load_single_file_transformer(path, family, source, torch_dtype)
                return pipeline_class(family).from_pretrained(source, transformer=transformer,
                                                              local_files_only=_local_only(source), **kwargs)
            source = str(path) if path.is_dir() else base_model
            if transformer is not None or without_transformer:
                kwargs["transformer"] = transformer
            return pipeline_class(family).from_pretrained(source, local_files_only=_local_only(source), **kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:
        name = get_family(family).name
        hint = "Check that it is complete and of that family."
        if path.is_file() and not single_file_config:
            hint = (f"{hint} A single-file checkpoint takes its VAE, text encoders and configs from the hub the first "
                    "time (FLUX.1-dev is gated: accept its licence on the hub and log in), or set single_file_config "
                    "to a diffusers folder of the same family.")
        raise ModelLoadError(f"Could not load the {name} model '{base_model}': {first_line(exc)}. {hint}") from None


def load_transformer(base_model: str, family: str, *, torch_dtype=None, single_file_config: str | None = None,
                     quantization_config=None, device_map=None):
    """The transformer alone (folder, hub id or single file), optionally quantized while loading."""
    path = Path(base_model).expanduser()
    with model_loading(base_model):
        if path.is_file():
            source = config_source(path, family, single_file_config)
            return load_single_file_transformer(path, family, source, torch_dtype)
        return transformer_from_folder(transformer_class(family), str(path) if path.is_dir() else base_model,
                                       torch_dtype, quantization_config, device_map)


def transformer_from_folder(cls, source: str, torch_dtype=None, quantization_config=None, device_map=None):
    """``cls`` from the ``transformer`` subfolder of a diffusers folder or hub id, optionally quantized."""
    kwargs: dict[str, Any] = {"dtype": torch_dtype} if torch_dtype is not None else {}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device_map is not None:
        kwargs["device_map"] = device_map
    return cls.from_pretrained(source, subfolder="transformer", local_files_only=_local_only(source), **kwargs)
