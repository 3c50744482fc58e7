"""Load the Qwen-Image and Z-Image pipelines: a diffusers folder, a hub id, or one single-file transformer.

    pipe = load_flow_pipeline("Qwen/Qwen-Image", "qwen_image")
    pipe = load_flow_pipeline("qwen_image_bf16.safetensors", "qwen_image", single_file_config="/models/Qwen-Image")
    pipe = load_flow_pipeline(folder, "z_image", without_transformer=True)   # the trainer adds its own later
    model = load_flow_transformer(folder, "qwen_image", torch_dtype=torch.bfloat16, quantization_config=...)

A single file holds the transformer only (as ComfyUI's ``diffusion_models`` files are published: Qwen-Image in
diffusers' own names, Z-Image in its original layout with fused ``attention.qkv``, both optionally under
``model.diffusion_model.``); the VAE, text encoder, tokenizer, scheduler and configs come from
``single_file_config`` (a diffusers folder or hub id of the same family), else from the released model on the
hub (``DEFAULT_CONFIG``). The registry entries point here (``pipeline_loader``); every load holds the
process-wide model-loading lock. An fp8 checkpoint is loaded into bf16 (the trainer quantizes it again as asked).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..errors import ModelLoadError
from ..families import get_family
from .flux_loading import _local_only, _source, transformer_from_folder
from .load_lock import model_loading
from .transformer_loading import load_pipeline_files

DEFAULT_CONFIG = {"qwen_image": "Qwen/Qwen-Image", "z_image": "Tongyi-MAI/Z-Image-Turbo"}
SINGLE_FILE_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def transformer_class(family: str):
    from diffusers import QwenImageTransformer2DModel, ZImageTransformer2DModel

    return {"qwen_image": QwenImageTransformer2DModel, "z_image": ZImageTransformer2DModel}[family]


def single_file_state(path: Path, family: str) -> dict[str, torch.Tensor]:
    """The transformer's tensors of a single file, in diffusers' names (prefix removed; Z-Image converted)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    for prefix in SINGLE_FILE_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    if family == "z_image" and any(".attention.qkv." in k for k in state):
        from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

        state = convert_z_image_transformer_checkpoint_to_diffusers(state)
    return state


def load_single_file_transformer(path: Path, family: str, source: str, torch_dtype=None):
    """The transformer of a single-file checkpoint, configured by ``source``'s ``transformer/config.json``."""
    from accelerate import init_empty_weights

    cls = transformer_class(family)
    config = cls.load_config(source, subfolder="transformer", local_files_only=_local_only(source))
    state = single_file_state(path, family)
    dtype = torch_dtype or next(iter(state.values())).dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):  # an fp8 checkpoint trains from bf16
        dtype = torch.bfloat16
    with init_empty_weights():
        model = cls.from_config(config)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise ModelLoadError(f"'{path.name}' does not match the {get_family(family).name} transformer of "
                             f"'{source}' ({len(missing)} missing, {len(unexpected)} unexpected tensors, e.g. "
                             f"'{first}'); set single_file_config to a diffusers folder of the same model.")
    return model


def config_source(family: str, single_file_config: str | None) -> str:
    return _source(single_file_config) if single_file_config else DEFAULT_CONFIG[family]


def load_flow_pipeline(base_model: str, family: str, *, torch_dtype=None, single_file_config: str | None = None,
                       transformer=None, without_transformer: bool = False,
                       report: Callable[[str], None] | None = None):
    """The family's pipeline (``QwenImagePipeline`` / ``ZImagePipeline``); ``transformer`` replaces the model's
    own (already loaded); ``without_transformer`` leaves it out (the trainer loads it after caching)."""
    path = Path(base_model).expanduser()
    hint = "" if single_file_config else (
        f"A single-file checkpoint holds the transformer only: it takes its VAE, text encoder and configs from "
        f"{DEFAULT_CONFIG[family]} on the hub the first time, or set single_file_config to a diffusers folder of "
        "the same family.")
    return load_pipeline_files(
        lambda _source: get_family(family).pipeline_class(), base_model, family,
        file_config=lambda: config_source(family, single_file_config),
        load_transformer=lambda: load_single_file_transformer(path, family, config_source(family, single_file_config),
                                                              torch_dtype),
        torch_dtype=torch_dtype, transformer=transformer, without_transformer=without_transformer, report=report,
        single_file_hint=hint)


def load_flow_transformer(base_model: str, family: str, *, torch_dtype=None, single_file_config: str | None = None,
                          quantization_config=None, device_map=None):
    """The transformer alone (folder, hub id or single file), optionally quantized while loading."""
    path = Path(base_model).expanduser()
    with model_loading(base_model):
        if path.is_file():
            return load_single_file_transformer(path, family, config_source(family, single_file_config),
                                                torch_dtype)
        return transformer_from_folder(transformer_class(family), str(path) if path.is_dir() else base_model,
                                       torch_dtype, quantization_config, device_map)
