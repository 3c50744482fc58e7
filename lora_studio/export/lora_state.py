"""Read an existing LoRA (kohya/A1111, diffusers, or a PEFT adapter folder) and start training from it.

``load_lora_file`` tells the formats apart by their keys; ``to_peft_states`` turns any of them into PEFT
state dicts per component (unet, text_encoder, text_encoder_2) with an alpha per module;
``apply_init_lora`` loads those into the adapters the trainer has already added (``set_peft_model_state_dict``).
The file's network type (``network_type``: LoRA, DoRA, LoKr, LoHa), rank and target modules must match the
run's; when only alpha differs, one factor (``lora_up``, ``lokr_w2``, ``hada_w2_b``) is rescaled so the LoRA
keeps exactly the effect it had.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import ModelLoadError
from .diffusers_format import WEIGHT_NAME, module_of, short_targets
from .kohya import TE_COMPONENTS, kohya_to_peft, module_rank

log = logging.getLogger(__name__)

COMPONENTS = ("unet",) + TE_COMPONENTS
_LABEL = {"unet": "UNet", "text_encoder": "text encoder", "text_encoder_2": "text encoder 2"}
PeftStates = tuple[dict[str, dict[str, torch.Tensor]], dict[str, float]]


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as fh:
        metadata = dict(fh.metadata() or {})
    return load_file(str(path)), metadata


def _weights_file(folder: Path) -> Path:
    for name in ("adapter_model.safetensors", WEIGHT_NAME):
        if (folder / name).is_file():
            return folder / name
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return files[0]
    raise ModelLoadError(f"'{folder}' holds {len(files) or 'no'} .safetensors files; give init_lora the LoRA file "
                         "itself.")


def load_lora_file(path: str | Path) -> tuple[str, dict[str, torch.Tensor], dict[str, str]]:
    """``(format, state, metadata)``: format is ``"kohya"``, ``"diffusers"`` or ``"peft"``.

    ``path`` is a ``.safetensors`` file, a diffusers LoRA folder, or a PEFT adapter folder
    (``adapter_config.json`` + ``adapter_model.safetensors``; its config is returned as
    ``metadata["adapter_config"]``, JSON text).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"The LoRA '{path}' was not found.")
    file = _weights_file(path) if path.is_dir() else path
    if file.suffix != ".safetensors":
        raise ModelLoadError(f"'{file.name}' is not a .safetensors file; LoRAs are read from .safetensors only.")
    try:
        state, metadata = _read_safetensors(file)
    except Exception as exc:
        raise ModelLoadError(f"'{file.name}' cannot be read as a safetensors file: {exc}.") from None
    config = file.parent / "adapter_config.json"
    if file.name == "adapter_model.safetensors" and config.is_file():
        metadata["adapter_config"] = config.read_text(encoding="utf-8")
        return "peft", state, metadata
    keys = list(state)
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        return "kohya", state, metadata
    if any(k.split(".", 1)[0] in COMPONENTS for k in keys):
        return "diffusers", state, metadata
    if any(k.startswith("base_model.model.") for k in keys):
        return "peft", state, metadata
    raise ModelLoadError(f"'{file.name}' is not a LoRA file this trainer can read (no kohya lora_unet_/lora_te "
                         "keys, no diffusers unet./text_encoder. keys).")


def _peft_key(key: str) -> str:
    """Older diffusers spellings -> PEFT (``.lora.down.weight``, ``.lora_linear_layer.up.weight``)."""
    for old, new in ((".lora.down.weight", ".lora_A.weight"), (".lora.up.weight", ".lora_B.weight"),
                     (".lora_linear_layer.down.weight", ".lora_A.weight"),
                     (".lora_linear_layer.up.weight", ".lora_B.weight")):
        if key.endswith(old):
            return key[: -len(old)] + new
    return key


def _alpha_from_config(config: Mapping[str, Any], module: str, rank: int) -> float:
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if module == pattern or module.endswith("." + pattern):
            return float(value)
    return float(config.get("lora_alpha", rank) or rank)


def _diffusers_states(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> PeftStates:
    packed = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    parts: dict[str, dict[str, torch.Tensor]] = {c: {} for c in COMPONENTS}
    alphas: dict[str, float] = {}
    for key, tensor in state.items():
        component, _, rest = key.partition(".")
        if component not in parts:
            raise ModelLoadError(f"diffusers LoRA key '{key}' belongs to no unet/text encoder")
        if rest.endswith(".alpha"):
            alphas[f"{component}.{rest[:-len('.alpha')]}"] = float(tensor.item())
        elif ".processor." in rest or "_lora." in rest:
            raise ModelLoadError("This is an old diffusers attention-processor LoRA; load it in diffusers and save it "
                                 "again with save_lora_weights, or use its kohya version.")
        else:
            parts[component][_peft_key(rest)] = tensor
    for component, sd in parts.items():
        config = {k[len(component) + 1:]: v for k, v in packed.items() if k.startswith(component + ".")}
        for key, tensor in sd.items():
            if key.endswith(".lora_A.weight"):
                module = module_of(key)
                alphas.setdefault(f"{component}.{module}", _alpha_from_config(config, module, tensor.shape[0]))
    return parts, alphas


def _peft_folder_states(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> PeftStates:
    config = json.loads(metadata.get("adapter_config") or "{}")
    sd = {_peft_key(k.removeprefix("base_model.model.")): v for k, v in state.items()}
    is_te = all(".self_attn." in k or ".mlp." in k or k.startswith("text_projection") for k in sd)
    component = "text_encoder" if is_te else "unet"
    alphas = {f"{component}.{module_of(k)}": _alpha_from_config(config, module_of(k), v.shape[0])
              for k, v in sd.items() if k.endswith(".lora_A.weight")}
    parts = {c: {} for c in COMPONENTS}
    parts[component] = sd
    return parts, alphas


def _nested(model: torch.nn.Module) -> bool:
    return any(name == "text_model" for name, _ in model.named_children())


def _relayout(key: str, nested: bool) -> str:
    """A CLIP key or module path with (``nested``) or without the ``text_model.`` level."""
    bare = key.removeprefix("text_model.")
    return "text_model." + bare if nested and not bare.startswith("text_projection") else bare


def _is_clip(model: torch.nn.Module) -> bool:
    return "clip" in str(getattr(getattr(model, "config", None), "model_type", ""))


def to_peft_states(fmt: str, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str], family: str,
                   unet: torch.nn.Module, text_encoders: Mapping[str, torch.nn.Module] | None = None) -> PeftStates:
    """``({component: PEFT state}, {"<component>.<module>": alpha})`` for the given models' key layout."""
    text_encoders = dict(text_encoders or {})
    if fmt == "kohya":
        modules = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        layouts = {name: _nested(model) for name, model in text_encoders.items()}
        try:
            unet_sd, te_sds, alphas = kohya_to_peft(state, family, unet.config, unet_modules=modules,
                                                    te_layouts=layouts or None)
        except ValueError as exc:
            raise ModelLoadError(f"The kohya LoRA does not fit this {family} model: {exc}.") from None
        parts = {"unet": unet_sd, **te_sds}
    elif fmt == "diffusers":
        parts, alphas = _diffusers_states(state, metadata)
    elif fmt == "peft":
        parts, alphas = _peft_folder_states(state, metadata)
    else:
        raise ValueError(f"unknown LoRA format {fmt!r}")
    for name, model in text_encoders.items():  # transformers 4 vs 5 CLIP layouts
        if parts.get(name) and _is_clip(model):
            nested = _nested(model)
            parts[name] = {_relayout(k, nested): v for k, v in parts[name].items()}
            alphas = {(f"{name}.{_relayout(k[len(name) + 1:], nested)}" if k.startswith(name + ".") else k): v
                      for k, v in alphas.items()}
    return parts, alphas


def by_module(sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {suffix: tensor}}`` of a PEFT state dict (any network type)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in sd.items():
        module = module_of(key)
        out.setdefault(module, {})[key[len(module) + 1:]] = tensor
    return out


def _ranks(sd: Mapping[str, torch.Tensor]) -> list[int]:
    return sorted({module_rank(t) for t in by_module(sd).values()})


def _describe(sd: Mapping[str, torch.Tensor], label: str) -> str:
    from ..networks import network_type_of_keys

    modules = by_module(sd)
    kind = network_type_of_keys(list(sd))
    rank = "/".join(str(r) for r in _ranks(sd))
    kind = "" if kind == "lora" else f"{kind} "
    return f"{kind}rank {rank} on {','.join(short_targets(modules))} ({label}, {len(modules)} modules)"


def _mismatch(name: str, component: str, file_sd: Mapping[str, torch.Tensor],
              model_sd: Mapping[str, torch.Tensor]) -> str:
    """What the file has, what the run has, and the config keys that make them match."""
    from ..networks import network_type_of_keys

    label = _LABEL[component]
    fixes = []
    kind = network_type_of_keys(list(file_sd))
    if kind != network_type_of_keys(list(model_sd)):
        fixes.append(f"network_type: {kind}")
    elif _ranks(file_sd) != _ranks(model_sd) and len(_ranks(file_sd)) == 1:
        fixes.append(f"lora_rank: {_ranks(file_sd)[0]}")
    if {module_of(k) for k in file_sd} != {module_of(k) for k in model_sd}:
        targets = short_targets(module_of(k) for k in file_sd)
        fixes.append(f"target_modules: [{', '.join(targets)}]" if component == "unet"
                     else f"text encoder LoRA on {','.join(targets)}")
    advice = f" Set {' and '.join(fixes)} to continue from it." if fixes else ""
    return f"'{name}' has {_describe(file_sd, label)}; this run has {_describe(model_sd, label)}.{advice}"


def _model_scale(model: torch.nn.Module, module: str, tensors: Mapping[str, torch.Tensor]) -> float:
    """alpha / r of ``module`` in the model's adapter (PEFT applies it to every network type)."""
    from ..networks import adapter_alpha

    config = model.peft_config["default"]
    rank = int(_pattern_value(config.rank_pattern, module, config.r))
    alpha = float(_pattern_value(config.alpha_pattern, module, adapter_alpha(config)))
    return alpha / rank


def _pattern_value(pattern: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    for key, value in (pattern or {}).items():
        if module == key or module.endswith("." + key):
            return value
    return default


def _has_adapter(model: torch.nn.Module) -> bool:
    return "default" in (getattr(model, "peft_config", None) or {})


_SCALED = ("lora_B.weight", "hada_w2_b", "lokr_w2", "lokr_w2_b")  # one factor per type carries the scale


def rescaled_to_model(file_sd: Mapping[str, torch.Tensor], model_sd: Mapping[str, torch.Tensor],
                      alphas: Mapping[str, float], component: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The file's tensors in the model's dtype, one factor per module scaled so that the model's alpha / r gives
    the file's effect exactly (same rank, other alpha; a full-factor LoKr's scale 1)."""
    new_sd = {k: v.to(model_sd[k].dtype) for k, v in file_sd.items()}
    for module, tensors in by_module(file_sd).items():
        rank = module_rank(tensors)
        file_scale = alphas.get(f"{component}.{module}", float(rank)) / rank
        factor = file_scale / _model_scale(model, module, tensors)
        if factor != 1.0:
            suffix = next(s for s in _SCALED if s in tensors)
            key = f"{module}.{suffix}"
            new_sd[key] = (file_sd[key].double() * factor).to(model_sd[key].dtype)
    return new_sd


def apply_init_lora(unet: torch.nn.Module, text_encoders: Mapping[str, torch.nn.Module], path: str | Path,
                    family: str) -> dict[str, int]:
    """Load an existing LoRA's weights into the PEFT adapter ("default") already added to each model.

    ``text_encoders`` are the models by component name (text_encoder, text_encoder_2); those without an
    adapter must have no weights in the file. Raises ``ModelLoadError`` naming what the file has when its
    rank or targets differ from the run's. Returns ``{component: modules loaded}``.
    """
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    fmt, state, metadata = load_lora_file(path)
    name = Path(path).name
    models = {"unet": unet, **dict(text_encoders or {})}
    parts, alphas = to_peft_states(fmt, state, metadata, family, unet, text_encoders)
    loaded: dict[str, int] = {}
    for component in COMPONENTS:
        file_sd, model = parts.get(component) or {}, models.get(component)
        has_adapter = model is not None and _has_adapter(model)
        if not file_sd:
            if has_adapter:
                log.warning("%s has no %s weights; that LoRA starts fresh.", name, _LABEL[component])
            continue
        if not has_adapter:
            hint = "set train_text_encoder: true" if component != "unet" else "the UNet has no LoRA adapter"
            raise ModelLoadError(f"'{name}' has {_describe(file_sd, _LABEL[component])}, but this run trains no "
                                 f"{_LABEL[component]} LoRA; {hint}.")
        model_sd = get_peft_model_state_dict(model)
        shapes_differ = set(file_sd) != set(model_sd) or any(file_sd[k].shape != model_sd[k].shape for k in file_sd)
        if shapes_differ:
            raise ModelLoadError(_mismatch(name, component, file_sd, model_sd))
        new_sd = rescaled_to_model(file_sd, model_sd, alphas, component, model)
        result = set_peft_model_state_dict(model, new_sd, adapter_name="default")
        unexpected = list(getattr(result, "unexpected_keys", None) or [])
        if unexpected:
            raise ModelLoadError(f"'{name}': {len(unexpected)} weights did not load into the {_LABEL[component]} "
                                 f"(first: {unexpected[0]}).")
        loaded[component] = len(by_module(new_sd))
        file_alphas = {v for k, v in alphas.items() if k.startswith(component + ".")}
        log.info("init_lora: %s %s loaded from %s (%s format, alpha %s)", loaded[component], _LABEL[component],
                 name, fmt, ",".join(f"{a:g}" for a in sorted(file_alphas)))
    return loaded
