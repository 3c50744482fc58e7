"""FLUX.1 / Chroma LoRA files that ComfyUI, Forge and diffusers load with every key placed.

The file (``<output_name>.safetensors``) holds, per trained layer of the transformer, diffusers' module path
under ``transformer.``: ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight`` (rank x in),
``.lora_B.weight`` (out x rank) and ``.alpha`` (a float32 scalar; the scale is alpha / rank). Other network types
(``networks.py``) keep the same key map with their LyCORIS tensors: DoRA adds ``.dora_scale``, LoKr writes
``.lokr_w1``/``.lokr_w2`` (or ``_a``/``_b``), LoHa ``.hada_w1_a`` ... ``.hada_w2_b``; ComfyUI's weight adapters
(``comfy/weight_adapter``) read them on every key its FLUX map places (fused BFL layers: their slice). Why this form:

- ComfyUI (``comfy/lora.py``, ``model_lora_keys_unet``) maps ``transformer.<diffusers name>`` for every FLUX model
  (Chroma's model class is a Flux subclass there) through ``comfy.utils.flux_to_diffusers``, reads
  ``lora_A``/``lora_B`` (its "diffusers2" form) and ``<key>.alpha``; fused BFL layers get their slice (to_q
  is the first third of ``img_attn.qkv``). Forge's backend carries the same map.
- diffusers' ``FluxLoraLoaderMixin`` loads ``transformer.*`` keys as they are and takes the ``.alpha`` keys as
  network alphas (it refuses a file with both alphas and its own ``lora_adapter_metadata`` header, so the
  file has no such header).
- kohya's ``lora_unet_double_blocks_*`` form would need the q/k/v LoRAs fused into one (rank x 3), and
  diffusers' converter for it assumes the released widths.

Only layers that ComfyUI's table names can be written (``COMFY_MAPPED``): a LoRA on any other layer would be
"lora key not loaded" there, so ``check_placement`` refuses it before the file is written. The metadata has
kohya's ``ss_*`` keys (``ss_base_model_version`` ``flux1`` / ``chroma``) and ``sshs_model_hash``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from ..errors import ModelLoadError, TrainingError

log = logging.getLogger(__name__)

PREFIX = "transformer."
# Qwen-Image and Z-Image files: ComfyUI's generic "diffusion_model.<name>" keys, which diffusers' Qwen-Image and
# Z-Image loaders also read (their converters add "transformer." to every key, so that prefix would be doubled)
DIFFUSION_MODEL_PREFIX = "diffusion_model."
# Layers ComfyUI's flux_to_diffusers maps (comfy/utils.py), relative to transformer_blocks.N and
# single_transformer_blocks.N
# single_transformer_blocks.N (FLUX.2's blocks are in the same table: its feed-forward linear_in / linear_out, and
# the single blocks' fused attn.to_qkv_mlp_proj / attn.to_out, ComfyUI's linear1 / linear2)
COMFY_DOUBLE = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                "attn.to_out.0", "attn.to_add_out", "norm1.linear", "norm1_context.linear", "ff.net.0.proj",
                "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
                "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out")
COMFY_SINGLE = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear",
                "attn.to_qkv_mlp_proj", "attn.to_out")
COMFY_TOP = ("x_embedder", "context_embedder", "proj_out", "time_text_embed.timestep_embedder.linear_1",
             "time_text_embed.timestep_embedder.linear_2", "time_text_embed.text_embedder.linear_1",
             "time_text_embed.text_embedder.linear_2", "time_text_embed.guidance_embedder.linear_1",
             "time_text_embed.guidance_embedder.linear_2")
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.\d+\.(.+)$")


def comfy_maps(module: str) -> bool:
    """Whether ComfyUI's FLUX key map places a LoRA on this transformer module path."""
    match = _BLOCK.match(module)
    if match:
        return match.group(2) in (COMFY_DOUBLE if match.group(1) == "transformer_blocks" else COMFY_SINGLE)
    return module in COMFY_TOP


def _modules(peft_state: Mapping[str, torch.Tensor]) -> list[str]:
    from .diffusers_format import module_of

    return sorted({module_of(k) for k in peft_state})


def check_placement(peft_state: Mapping[str, torch.Tensor], transformer: torch.nn.Module,
                    maps: Callable[[str], bool] = comfy_maps, known: Sequence[str] = COMFY_DOUBLE,
                    model: str = "FLUX") -> int:
    """The number of LoRA modules; TrainingError when one is not a layer of ``transformer`` or not in ComfyUI's map
    (``maps``: whether ComfyUI's key map of ``model`` places a module path; ``known``: layer names to suggest)."""
    names = {n.removesuffix(".base_layer") for n, _ in transformer.named_modules()}
    modules = _modules(peft_state)
    missing = [m for m in modules if m not in names]
    unmapped = [m for m in modules if not maps(m)]
    if missing or unmapped:
        first = (missing or unmapped)[0]
        why = "is not a layer of this model" if missing else f"has no place in ComfyUI's {model} key map"
        raise TrainingError(f"The LoRA layer '{first}' {why} ({len(missing or unmapped)} such layers); ComfyUI would "
                            "report 'lora key not loaded'. Use lora_targets attention or all_linear, or target_modules "
                            f"among: {', '.join(known)}.")
    return len(modules)


def file_state(peft_state: Mapping[str, torch.Tensor], alpha: float, dtype: torch.dtype = torch.float16,
               rank: int | None = None, prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    """``transformer.<module>.lora_A.weight`` / ``.lora_B.weight`` / ``.alpha`` from a PEFT state dict; DoRA adds
    ``.dora_scale``, LoKr and LoHa have their LyCORIS tensors (``lokr_w1`` ..., ``hada_w1_a`` ...) instead, as
    ComfyUI's weight adapters read them on this key map (``rank``: for a LoKr with two full factors)."""
    from .kohya import lycoris_module
    from .lora_state import by_module

    names = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}
    out: dict[str, torch.Tensor] = {}
    for module, tensors in by_module(peft_state).items():
        for suffix, value in lycoris_module(tensors, float(alpha), rank, dtype).items():
            out[f"{prefix}{module}.{names.get(suffix, suffix)}"] = value
    return out


def save_flux_lora(path: str | Path, peft_state: Mapping[str, torch.Tensor], *, rank: int, alpha: float,
                   metadata: Mapping[str, str], prefix: str = PREFIX) -> Path:
    """Write the file atomically with the ``ss_*`` metadata and the A1111 hashes (``rank`` for the record:
    every reader takes it from the tensors)."""
    from .kohya import save_kohya_lora

    meta = {**metadata, "format": "pt", "ss_network_dim": str(rank)}
    return save_kohya_lora(path, file_state(peft_state, alpha, rank=rank, prefix=prefix), meta)


def read_flux_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """(PEFT state, alpha per module) of a ``transformer.*`` LoRA file (this form, or diffusers' without alphas;
    the ``diffusion_model.*`` form of Qwen-Image and Z-Image;
    DoRA, LoKr and LoHa files too: a LoKr with two full factors gets alpha = its rank, scale 1)."""
    from safetensors.torch import load_file

    from .kohya import lokr_is_full, module_rank
    from .lora_state import by_module

    path = Path(path).expanduser()
    if not path.is_file() or path.suffix != ".safetensors":
        raise ModelLoadError(f"The LoRA '{path}' is not a .safetensors file (init_lora).")
    state = load_file(str(path))
    prefix = DIFFUSION_MODEL_PREFIX if any(k.startswith(DIFFUSION_MODEL_PREFIX) for k in state) else PREFIX
    peft = {}
    for key, value in state.items():
        if key.startswith(prefix) and not key.endswith(".alpha"):
            name = key[len(prefix):]
            peft[name.replace(".dora_scale", ".lora_magnitude_vector")] = (
                value.flatten() if name.endswith(".dora_scale") else value)
    if not peft:
        raise ModelLoadError(f"'{Path(path).name}' has no transformer.* LoRA keys; init_lora for FLUX takes a LoRA "
                             "written by LoRA Studio, diffusers, ai-toolkit or SimpleTuner.")
    alphas = {}
    for module, tensors in by_module(peft).items():
        key, rank = f"{prefix}{module}.alpha", module_rank(tensors)
        alphas[module] = float(rank) if lokr_is_full(tensors) or key not in state else float(state[key])
    return peft, alphas


def apply_init_lora(transformer: torch.nn.Module, path: str | Path, rank: int, alpha: float) -> None:
    """Load an existing LoRA into the adapters already added (same network type, rank and layers), keeping its
    effect exactly: when its alpha differs, one factor (``lora_B``, ``lokr_w2``, ``hada_w2_b``) is rescaled."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    from ..networks import network_type_of_keys
    from .lora_state import rescaled_to_model

    peft, alphas = read_flux_lora(path)
    model_sd = get_peft_model_state_dict(transformer)
    kind, run_kind = network_type_of_keys(list(peft)), network_type_of_keys(list(model_sd))
    if kind != run_kind:
        raise ModelLoadError(f"init_lora is a {kind} file but this run trains {run_kind}; set network_type: {kind}.")
    shapes = {k: tuple(v.shape) for k, v in peft.items()}
    differ = [k for k in peft if k in model_sd and tuple(model_sd[k].shape) != shapes[k]]
    if differ:
        raise ModelLoadError(f"init_lora's '{differ[0]}' has shape {shapes[differ[0]]}, this run's "
                             f"{tuple(model_sd[differ[0]].shape)}; set lora_rank to the rank it was trained with.")
    known = {k: v for k, v in peft.items() if k in model_sd}
    scaled = rescaled_to_model(known, model_sd, {f"transformer.{m}": a for m, a in alphas.items()}, "transformer",
                               transformer)
    unexpected = sorted(set(peft) - set(model_sd))
    if unexpected:
        raise ModelLoadError(f"init_lora has {len(unexpected)} layers this run does not train (first: "
                             f"{unexpected[0]}); use the same lora_targets and block indices as the run that wrote it.")
    set_peft_model_state_dict(transformer, {k: v.float() for k, v in scaled.items()})
