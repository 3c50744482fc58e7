"""SD3 / SD3.5 (and FLUX.2) LoRA files that ComfyUI and diffusers load with every key placed.

The file holds, per trained layer of the MMDiT, diffusers' module path under ``transformer.``:
``transformer.transformer_blocks.0.attn.to_q.lora_A.weight`` (rank x in) and ``.lora_B.weight`` (out x rank),
the form diffusers' own SD3 training script writes. Why this form, and why without ``.alpha`` keys:

- ComfyUI (``comfy/lora.py``, ``model_lora_keys_unet``) maps ``transformer.<diffusers name>`` for an SD3 model
  through ``comfy.utils.mmdit_to_diffusers`` (q, k and v are slices of the fused ``joint_blocks.N.x_block.attn.qkv``
  and ``context_block.attn.qkv``; SD3.5 Medium's second attention ``attn2`` likewise) and reads ``lora_A`` /
  ``lora_B``; without an alpha it applies the LoRA at scale 1.
- diffusers' ``SD3LoraLoaderMixin`` refuses a file with ``.alpha`` keys ("Make sure all LoRA param names contain
  'lora'") and loads ``lora_A`` / ``lora_B`` at scale 1 (its alpha = the rank).

So the trained scale ``alpha / rank`` is folded into ``lora_B`` and the file has no alpha: both readers give
exactly the trained weights. Other network types (DoRA, LoKr, LoHa) keep the LyCORIS tensors and alphas of
``flux_lora.file_state`` (ComfyUI's weight adapters read them; diffusers cannot load those, the project's own
PEFT loader does). Only layers ComfyUI's SD3 table names may be written (``comfy_maps_sd3``); the metadata has
kohya's ``ss_*`` keys with ``ss_base_model_version`` ``sd3``.

FLUX.2 files take the same form (``save_folded_lora``): diffusers' ``Flux2LoraLoaderMixin`` refuses alpha keys
too, and ComfyUI places FLUX.2's layers through its FLUX table (``flux_lora.COMFY_DOUBLE`` / ``COMFY_SINGLE``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch

# Layers of transformer_blocks.N that ComfyUI's mmdit_to_diffusers maps (comfy/utils.py)
COMFY_SD3_BLOCK = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                   "attn.to_out.0", "attn.to_add_out", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                   "norm1.linear", "norm1_context.linear", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                   "ff_context.net.2")
_BLOCK = re.compile(r"^transformer_blocks\.\d+\.(.+)$")


def comfy_maps_sd3(module: str) -> bool:
    """Whether ComfyUI's SD3 key map places a LoRA on this transformer module path."""
    match = _BLOCK.match(module)
    return bool(match) and match.group(1) in COMFY_SD3_BLOCK


def folded_state(peft_state: Mapping[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """A plain LoRA's PEFT state with ``alpha / rank`` multiplied into each ``lora_B`` (rank from its ``lora_A``)."""
    out = dict(peft_state)
    for key, value in peft_state.items():
        if key.endswith("lora_B.weight"):
            rank = peft_state[key.replace("lora_B.weight", "lora_A.weight")].shape[0]
            out[key] = value.float() * (float(alpha) / rank)
    return out


def save_folded_lora(path: str | Path, peft_state: Mapping[str, torch.Tensor], *, rank: int, alpha: float,
                  metadata: Mapping[str, str]) -> Path:
    """Write the file atomically with the ``ss_*`` metadata and the A1111 hashes (see the module doc)."""
    from ..networks import network_type_of_keys
    from .flux_lora import file_state
    from .kohya import save_kohya_lora

    meta = {**metadata, "format": "pt", "ss_network_dim": str(rank)}
    if network_type_of_keys(list(peft_state)) != "lora":
        return save_kohya_lora(path, file_state(peft_state, alpha, rank=rank), meta)
    state = {k: v for k, v in file_state(folded_state(peft_state, alpha), rank).items() if not k.endswith(".alpha")}
    meta.update(ss_network_alpha=str(float(rank)), lora_studio_trained_alpha=str(float(alpha)))
    return save_kohya_lora(path, state, meta)
