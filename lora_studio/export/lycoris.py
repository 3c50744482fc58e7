"""Load a DoRA, LoKr or LoHa file (kohya/LyCORIS keys) into a diffusers pipeline, through PEFT.

diffusers' ``load_lora_weights`` reads plain LoRA files (and applies a kohya ``dora_scale`` the PEFT way, per
output channel, which is not what A1111/Forge and ComfyUI do); it cannot read LoKr or LoHa. The export check,
the Testing tab's grids and ``generate`` therefore load these files here: the keys become PEFT state dicts
(``lora_state.to_peft_states``), each component gets the matching PEFT adapter (``networks``: one rank and
alpha per module, as the file has them; DoRA on the input axis), and the weights are set. The adapter then
works with diffusers' ``set_adapters`` / ``disable_lora`` / ``delete_adapters`` like any other.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import ModelLoadError
from .kohya import module_rank
from .lora_state import by_module, load_lora_file, to_peft_states

NEEDS_PEFT = ("dora", "lokr", "loha")  # network types diffusers' load_lora_weights cannot load as the tools do


def file_network_type(path: str | Path) -> str:
    """lora, dora, lokr or loha, from the file's key names (reads only the header)."""
    from safetensors import safe_open

    from ..networks import network_type_of_keys

    path = Path(path)
    if path.is_dir() or path.suffix != ".safetensors":
        return "lora"
    with safe_open(str(path), framework="pt") as fh:
        return network_type_of_keys(list(fh.keys()))


def needs_peft_loader(path: str | Path) -> bool:
    return file_network_type(path) in NEEDS_PEFT


def config_for_state(network_type: str, sd: Mapping[str, torch.Tensor], alphas: Mapping[str, float],
                     component: str):
    """A PEFT config that builds exactly the adapter ``sd`` holds: its modules, and their ranks and alphas."""
    from ..networks import peft_config

    modules = by_module(sd)
    ranks = {m: module_rank(t) for m, t in modules.items()}
    alpha_of = {m: float(alphas.get(f"{component}.{m}", ranks[m])) for m in modules}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alpha_of.values()).most_common(1)[0][0]
    config = peft_config(network_type, rank, alpha, sorted(modules),
                         rank_pattern={re.escape(m): r for m, r in ranks.items() if r != rank},
                         alpha_pattern={re.escape(m): a for m, a in alpha_of.items() if a != alpha})
    if network_type == "lokr" and any("lokr_w1_a" in t for t in modules.values()):
        config.decompose_both = True
    return config


def load_network_file(pipe: Any, path: str | Path, family: str, adapter_name: str) -> str:
    """Add the file's adapter to ``pipe``'s UNet and text encoders as ``adapter_name``; returns its network type.

    Raises ``ModelLoadError`` when the file does not fit the model (other family, other layout)."""
    from peft.utils import set_peft_model_state_dict

    from ..networks import add_network, network_type_of_keys

    path = Path(path)
    parts, alphas, models = _file_parts(pipe, path, family)
    kind = network_type_of_keys([k for sd in parts.values() for k in sd])
    for component, sd in parts.items():
        if not sd:
            continue
        model = models.get(component)
        if model is None:
            raise ModelLoadError(f"'{path.name}' has {component} weights, but this model has no {component}.")
        dtype = next(model.parameters()).dtype
        add_network(model, kind, config_for_state(kind, sd, alphas, component), adapter_name)
        model.to(dtype)  # the new adapter in the pipeline's precision (fp16 on a GPU)
        try:
            result = set_peft_model_state_dict(model, {k: v.to(dtype) for k, v in sd.items()},
                                               adapter_name=adapter_name)
        except RuntimeError as exc:  # shapes: another layout, or a LyCORIS factor PEFT does not build
            raise ModelLoadError(f"'{path.name}' does not fit this {family} model: "
                                 f"{str(exc).splitlines()[0][:300]}") from None
        unexpected = list(getattr(result, "unexpected_keys", None) or [])
        if unexpected:
            raise ModelLoadError(f"'{path.name}': {len(unexpected)} weights did not load into the {component} "
                                 f"(first: {unexpected[0]}).")
    return kind


def _file_parts(pipe: Any, path: Path, family: str):
    """``({component: PEFT state}, {"<component>.<module>": alpha}, {component: model})`` of a LoRA file: the
    ``transformer.*`` form of FLUX/Chroma (``flux_lora``), or kohya keys for the UNet and text encoders."""
    if getattr(pipe, "unet", None) is None:
        from .flux_lora import read_flux_lora

        peft, alphas = read_flux_lora(path)
        return ({"transformer": peft}, {f"transformer.{m}": a for m, a in alphas.items()},
                {"transformer": pipe.transformer})
    fmt, state, metadata = load_lora_file(path)
    encoders = {n: getattr(pipe, n) for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None}
    parts, alphas = to_peft_states(fmt, state, metadata, family, pipe.unet, encoders)
    return parts, alphas, {"unet": pipe.unet, **encoders}


def load_into_pipeline(pipe: Any, path: str | Path, family: str, adapter_name: str) -> str:
    """Load any LoRA file or folder this project writes or reads into ``pipe`` as ``adapter_name``: DoRA, LoKr
    and LoHa files through PEFT (``load_network_file``), plain LoRA files and diffusers folders with diffusers'
    ``load_lora_weights``. Returns the network type."""
    path = Path(path)
    if needs_peft_loader(path):
        return load_network_file(pipe, path, family, adapter_name)
    if path.is_dir():
        pipe.load_lora_weights(str(path), adapter_name=adapter_name)
    else:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter_name)
    return "lora"
