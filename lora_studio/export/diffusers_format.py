"""Diffusers-format LoRA files: ``pytorch_lora_weights.safetensors`` written by the pipeline's ``save_lora_weights``.

The file carries the adapter config (rank, ``lora_alpha``, targets) in its ``lora_adapter_metadata``
header entry. Without it diffusers reloads the LoRA with alpha = rank, i.e. at the wrong strength
whenever ``lora_alpha`` differs from the rank. The folder is written beside its final place and swapped in,
so a crash never leaves a half-written folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ..fileio import make_temp_dir

log = logging.getLogger(__name__)

WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def module_of(key: str) -> str:
    """``a.b.to_q.lora_A.weight`` -> ``a.b.to_q``."""
    for marker in (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B"):
        if marker in key:
            return key.split(marker, 1)[0]
    raise ValueError(f"'{key}' is not a PEFT LoRA key")


def short_target(module: str) -> str:
    """The name a ``target_modules`` entry uses: ``...attn1.to_out.0`` -> ``to_out.0``, ``...q_proj`` -> ``q_proj``."""
    parts = module.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


_USUAL_ORDER = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")


def short_targets(modules: Iterable[str]) -> list[str]:
    """The distinct ``short_target`` names, the usual ones first in their usual order (to_q, to_k, to_v, to_out.0)."""
    names = {short_target(m) for m in modules}
    return sorted(names, key=lambda n: (_USUAL_ORDER.index(n) if n in _USUAL_ORDER else len(_USUAL_ORDER), n))


def adapter_config(state: Mapping[str, torch.Tensor], rank: int, alpha: float | Mapping[str, float],
                   component: str) -> dict[str, Any]:
    """``LoraConfig(...).to_dict()`` describing ``state``: targets, rank and alpha (patterns where they vary)."""
    from peft import LoraConfig

    modules = sorted({module_of(k) for k in state})
    ranks = {m: int(state[f"{m}.lora_A.weight"].shape[0]) for m in modules}
    alphas = {m: float(alpha[f"{component}.{m}"] if isinstance(alpha, Mapping) else alpha) for m in modules}
    common_alpha = Counter(alphas.values()).most_common(1)[0][0] if alphas else float(rank)
    config = LoraConfig(
        r=int(rank), lora_alpha=common_alpha, target_modules=short_targets(modules),
        rank_pattern={m: r for m, r in ranks.items() if r != rank},
        alpha_pattern={m: a for m, a in alphas.items() if a != common_alpha},
        init_lora_weights="gaussian")
    data = config.to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in data.items()}


def _swap_in(tmp: Path, folder: Path) -> None:
    old = None
    if folder.exists():
        old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old-"))
        os.replace(folder, old / folder.name)
    try:
        os.replace(tmp, folder)
    except BaseException:
        if old is not None:
            os.replace(old / folder.name, folder)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def save_diffusers_lora(folder: str | Path, pipeline_class: type, unet_state: Mapping[str, torch.Tensor],
                        text_encoder_states: Mapping[str, Mapping[str, torch.Tensor]] | None, *, rank: int,
                        alpha: float | Mapping[str, float], family: str, weight_name: str = WEIGHT_NAME,
                        dtype: torch.dtype | None = None) -> Path:
    """Write ``folder/weight_name`` with ``pipeline_class.save_lora_weights`` and the adapter metadata.

    The states are PEFT state dicts (``get_peft_model_state_dict``); ``alpha`` is one value or per module
    (``"<component>.<module>"``). Returns the folder: load it with
    ``pipe.load_lora_weights(folder, weight_name=weight_name)``.
    """
    folder = Path(folder)
    tes = {k: v for k, v in (text_encoder_states or {}).items() if v}
    if family != "sdxl" and "text_encoder_2" in tes:
        raise ValueError(f"a {family} model has no text_encoder_2")

    def prepared(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in state.items()}

    kwargs: dict[str, Any] = {"weight_name": weight_name, "safe_serialization": True}
    if unet_state:
        kwargs["unet_lora_layers"] = prepared(unet_state)
        kwargs["unet_lora_adapter_metadata"] = adapter_config(unet_state, rank, alpha, "unet")
    for name, state in tes.items():
        kwargs[f"{name}_lora_layers"] = prepared(state)
        kwargs[f"{name}_lora_adapter_metadata"] = adapter_config(state, rank, alpha, name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(folder.parent, folder.name)
    try:
        pipeline_class.save_lora_weights(str(tmp), **kwargs)
        if not (tmp / weight_name).is_file():
            raise RuntimeError(f"{pipeline_class.__name__}.save_lora_weights wrote no {weight_name}")
        _swap_in(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s", folder / weight_name)
    return folder
