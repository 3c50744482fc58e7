"""FLUX.1 transformer weights in the original BFL layout (``double_blocks.*``) <-> diffusers' names.

FLUX.1 files as Black Forest Labs and ComfyUI publish them (``flux1-dev.safetensors``, fine-tunes from model
sites, optionally under ``model.diffusion_model.``) fuse what diffusers keeps apart: a double block's
``img_attn.qkv`` is diffusers' ``attn.to_q``, ``to_k`` and ``to_v`` stacked, a single block's ``linear1`` is
``to_q``, ``to_k``, ``to_v`` and ``proj_mlp`` stacked, and ``final_layer.adaLN_modulation.1`` holds
(shift, scale) where diffusers' ``norm_out.linear`` holds (scale, shift). The table below is that layout (the
same one ComfyUI's ``flux_to_diffusers`` and diffusers' single-file converter use). Widths are read from the
tensors, so a checkpoint of any size converts (diffusers' own converter assumes the released 3072).
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..families import BFL_PREFIXES

PREFIXES = BFL_PREFIXES  # a ComfyUI-style file keeps the transformer under one of these
# (BFL name, diffusers names stacked along dim 0) inside double block i / single block i
_DOUBLE = (
    ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("img_attn.proj", ("attn.to_out.0",)), ("txt_attn.proj", ("attn.to_add_out",)),
    ("img_mod.lin", ("norm1.linear",)), ("txt_mod.lin", ("norm1_context.linear",)),
    ("img_mlp.0", ("ff.net.0.proj",)), ("img_mlp.2", ("ff.net.2",)),
    ("txt_mlp.0", ("ff_context.net.0.proj",)), ("txt_mlp.2", ("ff_context.net.2",)),
)
_DOUBLE_NORMS = (("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
                 ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
                 ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
                 ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"))
_SINGLE = (("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")), ("linear2", ("proj_out",)),
           ("modulation.lin", ("norm.linear",)))
_SINGLE_NORMS = (("norm.query_norm.scale", "attn.norm_q.weight"), ("norm.key_norm.scale", "attn.norm_k.weight"))
_BASIC = (("img_in", "x_embedder"), ("txt_in", "context_embedder"),
          ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
          ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
          ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
          ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
          ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
          ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
          ("final_layer.linear", "proj_out"))
_SWAPPED = ("final_layer.adaLN_modulation.1", "norm_out.linear")  # (shift, scale) <-> (scale, shift)


def strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The transformer's weights without a ComfyUI-style ``model.diffusion_model.`` prefix (other parts dropped)."""
    for prefix in PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def block_counts(keys) -> tuple[int, int]:
    """(double blocks, single blocks) of a BFL-layout state dict."""
    def count(prefix: str) -> int:
        found = {int(k.split(".")[1]) for k in keys if k.startswith(prefix)}
        return max(found) + 1 if found else 0

    return count("double_blocks."), count("single_blocks.")


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _pairs(doubles: int, singles: int):
    """(BFL prefix, diffusers prefixes) of every fused or renamed layer (weights and biases follow)."""
    for i in range(doubles):
        for bfl, names in _DOUBLE:
            yield f"double_blocks.{i}.{bfl}", [f"transformer_blocks.{i}.{n}" for n in names]
    for i in range(singles):
        for bfl, names in _SINGLE:
            yield f"single_blocks.{i}.{bfl}", [f"single_transformer_blocks.{i}.{n}" for n in names]
    for bfl, name in _BASIC:
        yield bfl, [name]


def _norm_pairs(doubles: int, singles: int):
    for i in range(doubles):
        for bfl, name in _DOUBLE_NORMS:
            yield f"double_blocks.{i}.{bfl}", f"transformer_blocks.{i}.{name}"
    for i in range(singles):
        for bfl, name in _SINGLE_NORMS:
            yield f"single_blocks.{i}.{bfl}", f"single_transformer_blocks.{i}.{name}"


def bfl_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``FluxTransformer2DModel`` state dict from BFL-layout weights. KeyError names a missing weight."""
    src = strip_prefix(state)
    doubles, singles = block_counts(src)
    hidden = src["img_in.weight"].shape[0]
    out: dict[str, torch.Tensor] = {}
    for bfl, names in _pairs(doubles, singles):
        for end in ("weight", "bias"):
            if f"{bfl}.{end}" not in src:
                continue
            tensor = src[f"{bfl}.{end}"]
            sizes = [hidden] * (len(names) - 1)
            sizes.append(tensor.shape[0] - sum(sizes))
            if len(names) > 1 and bfl.endswith("qkv"):
                sizes = [tensor.shape[0] // 3] * 3
            for name, part in zip(names, torch.split(tensor, sizes, dim=0)):
                out[f"{name}.{end}"] = part.contiguous()
    for bfl, name in _norm_pairs(doubles, singles):
        out[name] = src[bfl]
    for end in ("weight", "bias"):
        if f"{_SWAPPED[0]}.{end}" in src:
            out[f"{_SWAPPED[1]}.{end}"] = _swap_halves(src[f"{_SWAPPED[0]}.{end}"])
    return out


def diffusers_to_bfl(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL-layout weights from a ``FluxTransformer2DModel`` state dict (the inverse of ``bfl_to_diffusers``)."""
    keys = list(state)
    doubles = len({k.split(".")[1] for k in keys if k.startswith("transformer_blocks.")})
    singles = len({k.split(".")[1] for k in keys if k.startswith("single_transformer_blocks.")})
    out: dict[str, torch.Tensor] = {}
    for bfl, names in _pairs(doubles, singles):
        for end in ("weight", "bias"):
            parts = [state[f"{n}.{end}"] for n in names if f"{n}.{end}" in state]
            if parts:
                out[f"{bfl}.{end}"] = torch.cat(parts, dim=0)
    for bfl, name in _norm_pairs(doubles, singles):
        out[bfl] = state[name]
    for end in ("weight", "bias"):
        if f"{_SWAPPED[1]}.{end}" in state:
            out[f"{_SWAPPED[0]}.{end}"] = _swap_halves(state[f"{_SWAPPED[1]}.{end}"])
    return out


def transformer_config(state: Mapping[str, torch.Tensor], base_config: Mapping | None = None) -> dict:
    """The ``FluxTransformer2DModel`` config of BFL-layout weights: sizes from the tensors, the rest (head
    size, rope axes) from ``base_config`` (a diffusers config of the same family) or FLUX.1's."""
    src = strip_prefix(state)
    doubles, singles = block_counts(src)
    config = dict(base_config or {"patch_size": 1, "attention_head_dim": 128, "axes_dims_rope": (16, 56, 56)})
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    hidden = src["img_in.weight"].shape[0]
    config.update(in_channels=src["img_in.weight"].shape[1], num_layers=doubles, num_single_layers=singles,
                  num_attention_heads=hidden // config.get("attention_head_dim", 128),
                  joint_attention_dim=src["txt_in.weight"].shape[1],
                  pooled_projection_dim=src["vector_in.in_layer.weight"].shape[1],
                  guidance_embeds="guidance_in.in_layer.weight" in src)
    return config
