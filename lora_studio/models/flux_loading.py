"""Load FLUX.1 and Chroma pipelines: a diffusers folder, a hub id, or one single-file checkpoint.

    pipe = load_flux_pipeline("black-forest-labs/FLUX.1-dev", "flux")
    pipe = load_flux_pipeline("flux1-dev.safetensors", "flux", single_file_config="/models/FLUX.1-dev")
    pipe = load_flux_pipeline(folder, "flux", transformer=quantized)      # a transformer loaded by the trainer

A single file holds the transformer only (BFL/ComfyUI layout, ``models.flux_single_file``); the VAE, text
encoders, tokenizers, scheduler and configs come from ``single_file_config`` (a diffusers folder or hub id of
the same family), else from the released model on the hub (``DEFAULT_CONFIG``; FLUX.1-dev is gated: accept
its licence on the hub and log in once). ``detect_single_file`` tells FLUX.1 and Chroma files apart.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import ModelLoadError

DEFAULT_CONFIG = {"flux-dev": "black-forest-labs/FLUX.1-dev", "flux-schnell": "black-forest-labs/FLUX.1-schnell",
                  "chroma": "lodestones/Chroma1-HD"}
CHROMA_KEYS = ("distilled_guidance_layer.",)
FLUX_KEYS = ("double_blocks.",)


def pipeline_class(family: str):
    from diffusers import ChromaPipeline, FluxPipeline

    return ChromaPipeline if family == "chroma" else FluxPipeline


def transformer_class(family: str):
    from diffusers import ChromaTransformer2DModel, FluxTransformer2DModel

    return ChromaTransformer2DModel if family == "chroma" else FluxTransformer2DModel


def detect_single_file(keys) -> str | None:
    """'flux' or 'chroma' for a checkpoint's tensor names in the BFL layout (with or without
    ``model.diffusion_model.``), else None."""
    from .flux_single_file import PREFIXES

    bare = {next((k[len(p):] for p in PREFIXES if k.startswith(p)), k) for k in keys}
    if any(k.startswith(CHROMA_KEYS) for k in bare):
        return "chroma"
    if any(k.startswith(FLUX_KEYS) for k in bare):
        return "flux"
    return None


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
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        guided = any(k.endswith("guidance_in.in_layer.weight") for k in fh.keys())
    return DEFAULT_CONFIG["flux-dev" if guided else "flux-schnell"]


def load_single_file_transformer(path: Path, family: str, source: str, torch_dtype=None):
    """The transformer of a single-file checkpoint, with ``source``'s transformer config for what the tensors
    do not tell (head size, rope axes)."""
    cls = transformer_class(family)
    if family == "chroma":  # diffusers' converter (it assumes the released width)
        return cls.from_single_file(str(path), config=source, subfolder="transformer", torch_dtype=torch_dtype,
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
    from .loading import _first_line

    path = Path(base_model).expanduser()
    kwargs: dict[str, Any] = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    try:
        with download_progress(base_model, report):
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
        name = "Chroma" if family == "chroma" else "FLUX.1"
        hint = "Check that it is complete and of that family."
        if path.is_file() and not single_file_config:
            hint = (f"{hint} A single-file checkpoint takes its VAE, text encoders and configs from the hub the first "
                    "time (FLUX.1-dev is gated: accept its licence on the hub and log in), or set single_file_config "
                    "to a diffusers folder of the same family.")
        raise ModelLoadError(f"Could not load the {name} model '{base_model}': {_first_line(exc)}. {hint}") from None


def load_transformer(base_model: str, family: str, *, torch_dtype=None, single_file_config: str | None = None,
                     quantization_config=None, device_map=None):
    """The transformer alone (folder, hub id or single file), optionally quantized while loading."""
    path = Path(base_model).expanduser()
    if path.is_file():
        source = config_source(path, family, single_file_config)
        return load_single_file_transformer(path, family, source, torch_dtype)
    source = str(path) if path.is_dir() else base_model
    kwargs: dict[str, Any] = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device_map is not None:
        kwargs["device_map"] = device_map
    return transformer_class(family).from_pretrained(source, subfolder="transformer",
                                                     local_files_only=_local_only(source), **kwargs)
