"""The network types a LoRA can be (``network_type``), all as PEFT adapters.

- ``lora``: PEFT ``LoraConfig``: ``W + (alpha / r) B A``.
- ``dora``: PEFT ``LoraConfig(use_dora=True)`` with a learned magnitude. For images the weight is decomposed per
  *input* channel, the way LyCORIS (its default), AUTOMATIC1111/Forge and ComfyUI apply a kohya file's
  ``dora_scale``: ``W' = (W + s B A) * m / ||W + s B A||`` with one norm and one magnitude ``m`` per input column,
  and strength ``t`` gives ``W + t (W' - W)`` (strength 0 is exactly the base). PEFT's own DoRA normalises per
  output channel and scales the update (not the result) with the strength, which those tools would read as a
  different model, so ``use_input_axis_dora`` swaps PEFT's DoRA for ``InputAxisDora`` (a PEFT LoRA variant).
  Language models keep PEFT's own DoRA (their adapters are loaded by PEFT, llama.cpp ...).
- ``lokr`` / ``loha``: PEFT ``LoKrConfig`` / ``LoHaConfig``, LyCORIS' Kronecker and Hadamard products
  (``lokr_w1``, ``lokr_w2`` (or ``lokr_w2_a``/``_b``) and ``hada_w1_a`` ... ``hada_w2_b``, scale alpha / r). Their
  strength scales the update linearly in PEFT and in the tools alike.

``set_strength`` sets an adapter's strength on every adapted layer of a model (0 = the base exactly).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import LoraVariant

NETWORK_TYPES = ("lora", "dora", "lokr", "loha")
IMAGE_NETWORK_TYPES = NETWORK_TYPES
TEXT_NETWORK_TYPES = ("lora", "dora")
KOHYA_MODULES = {"lora": "networks.lora", "dora": "lycoris.kohya", "lokr": "lycoris.kohya", "loha": "lycoris.kohya"}


def peft_config(network_type: str, rank: int, alpha: float, targets: Sequence[str], *, dropout: float = 0.0,
                rank_pattern: Mapping[str, int] | None = None, alpha_pattern: Mapping[str, float] | None = None):
    """The PEFT config of ``network_type`` (one rank and alpha, or per module through the patterns)."""
    common = dict(target_modules=list(targets), rank_pattern=dict(rank_pattern or {}),
                  alpha_pattern=dict(alpha_pattern or {}))
    if network_type in ("lora", "dora"):
        from peft import LoraConfig

        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                          use_dora=network_type == "dora", **common)
    if network_type == "lokr":
        from peft import LoKrConfig

        return LoKrConfig(r=rank, alpha=alpha, rank_dropout=dropout, **common)
    if network_type == "loha":
        from peft import LoHaConfig

        return LoHaConfig(r=rank, alpha=alpha, rank_dropout=dropout, **common)
    raise ValueError(f"unknown network_type {network_type!r}; one of {', '.join(NETWORK_TYPES)}")


def add_network(model: torch.nn.Module, network_type: str, config, adapter_name: str = "default") -> None:
    """Add the adapter (``model.add_adapter``: a diffusers or transformers model); DoRA on the input axis."""
    model.add_adapter(config, adapter_name=adapter_name)
    if network_type == "dora":
        use_input_axis_dora(model, adapter_name)


def network_type_of_keys(keys: Sequence[str]) -> str:
    """The network type of a PEFT or kohya/LyCORIS state dict, from its key names."""
    names = " ".join(keys)
    if "lokr_w" in names:
        return "lokr"
    if "hada_w" in names:
        return "loha"
    if "lora_magnitude_vector" in names or "dora_scale" in names:
        return "dora"
    return "lora"


def kohya_network_metadata(config: Any) -> dict[str, str]:
    """``ss_network_module`` and ``ss_network_args`` of a kohya file, as LyCORIS writes them for its algorithms."""
    import json

    kind = config.network_type
    if kind == "lora":
        return {"ss_network_module": "networks.lora"}
    args = {"algo": "lora" if kind == "dora" else kind, "dora_wd": kind == "dora"}
    if kind == "lokr":
        args["factor"] = -1
    return {"ss_network_module": KOHYA_MODULES[kind], "ss_network_args": json.dumps(args)}


def adapter_alpha(config: Any) -> float:
    """A PEFT config's alpha (``lora_alpha`` for LoRA/DoRA, ``alpha`` for LoKr/LoHa)."""
    alpha = getattr(config, "lora_alpha", None)
    return float(alpha if alpha is not None else config.alpha)


# --- DoRA on the input axis ----------------------------------------------------------------------------------
def _delta(module, adapter: str) -> torch.Tensor:
    """``B A`` in the base weight's shape (float32)."""
    a = module.lora_A[adapter].weight.float()
    b = module.lora_B[adapter].weight.float()
    return (b.flatten(1) @ a.flatten(1)).reshape(module.get_base_layer().weight.shape)


def column_norm(weight: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each input column of a Linear/Conv weight ``(out, in, ...)``: shape ``(in,)``."""
    return weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)


def _unit_scaling(module, adapter: str) -> float:
    return module.lora_alpha[adapter] / module.r[adapter]


class InputAxisDora(LoraVariant):
    """A PEFT LoRA variant: DoRA with one magnitude per input channel, applied the way A1111 and ComfyUI apply a
    kohya ``dora_scale`` (see the module doc). The magnitude lives where PEFT keeps DoRA's
    (``lora_magnitude_vector[adapter].weight``, shape ``(in,)``); the norm is not differentiated (as in PEFT and
    the DoRA paper, section 4.3)."""

    def supports_lora_conversion(self) -> bool:
        return False

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        unit = _unit_scaling(module, active_adapter)
        strength = module.scaling[active_adapter] / unit
        if strength == 0:
            return result
        base = module.get_base_layer()
        weight = base.weight
        with torch.no_grad():
            norm = column_norm(weight.float() + unit * _delta(module, active_adapter))
        scale = module.lora_magnitude_vector[active_adapter].weight / norm
        conv = weight.ndim > 2
        scale = (scale.view(1, -1, *([1] * (x.ndim - 2))) if conv else scale).to(x.dtype)
        shifted = x * (scale - 1)
        extra = base._conv_forward(shifted, weight.to(x.dtype), None) if conv else F.linear(shifted, weight.to(x.dtype))
        dropout = module.lora_dropout[active_adapter]
        lora = module.lora_B[active_adapter](module.lora_A[active_adapter](dropout(x * scale))) * unit
        return result + strength * (extra + lora).to(result.dtype)


def use_input_axis_dora(model: torch.nn.Module, adapter_name: str = "default") -> int:
    """Turn PEFT's DoRA adapter ``adapter_name`` into ``InputAxisDora`` on every layer of ``model``; the magnitude
    starts as the column norms of ``W + s B A`` (the layer's output is unchanged). Returns the layers changed."""
    changed = 0
    for module in model.modules():
        variants = getattr(module, "lora_variant", None)
        if not variants or adapter_name not in variants:
            continue
        magnitude = module.lora_magnitude_vector[adapter_name]
        with torch.no_grad():
            norm = column_norm(module.get_base_layer().weight.float() + _unit_scaling(module, adapter_name)
                               * _delta(module, adapter_name))
        old = magnitude.weight
        magnitude.weight = torch.nn.Parameter(norm.to(old.device, old.dtype), requires_grad=old.requires_grad)
        variants[adapter_name] = InputAxisDora()
        changed += 1
    return changed


def set_strength(model: torch.nn.Module, adapter_name: str, strength: float) -> int:
    """Scale ``adapter_name`` on every PEFT layer of ``model`` (0 turns it off exactly). Returns the layers set."""
    count = 0
    for module in model.modules():
        if callable(getattr(module, "set_scale", None)) and adapter_name in getattr(module, "scaling", {}):
            module.set_scale(adapter_name, float(strength))
            count += 1
    return count
