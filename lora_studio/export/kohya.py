"""Kohya/A1111 LoRA files: convert PEFT state dicts to kohya keys and back, and write the file.

Kohya keys (what AUTOMATIC1111, Forge and ComfyUI load; diffusers' ``load_lora_weights`` reads them too):

- ``lora_unet_<module path, dots as _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (one float
  scalar per module; the effective scale is alpha / rank, as in PEFT).
- SD1.x/SD2.x UNet paths keep diffusers' block names (kohya trains those on the diffusers UNet):
  ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0``.
- SDXL UNet paths use the original Stability AI (SGM) names, as kohya's ``sdxl_original_unet`` does:
  ``lora_unet_input_blocks_4_1_...``, ``middle_block_1_...``, ``output_blocks_0_1_...``. The map from
  diffusers blocks to SAI blocks is built from the UNet config (layers per block, block types), the
  layout ``diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint`` reads, so it also holds for
  UNets whose layout differs from the real SDXL one.
- Text encoders: ``lora_te_text_model_encoder_layers_0_self_attn_q_proj`` (SD1.x/SD2.x), ``lora_te1_`` and
  ``lora_te2_`` (SDXL). transformers 5's ``CLIPTextModel`` has no ``text_model.`` level (its
  ``CLIPTextModelWithProjection`` still has one); the kohya key always contains ``text_model_``.

diffusers' ``convert_state_dict_to_kohya`` is not used: it writes ``lora_te1_`` for SD1.5, keeps diffusers
names for SDXL and fixes alpha to the rank. Alphas given per module are keyed
``"<component>.<module path>"`` (component: unet, text_encoder, text_encoder_2).
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ..fileio import atomic_save_safetensors

log = logging.getLogger(__name__)

FAMILIES = ("sd15", "sd2", "sdxl")
TE_COMPONENTS = ("text_encoder", "text_encoder_2")
_PEFT_SUFFIX = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
_KOHYA_SUFFIX = {v: k for k, v in _PEFT_SUFFIX.items()}
# diffusers ResnetBlock2D child -> SAI ResBlock child
_RESNET_CHILDREN = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_CLIP_LAYER_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                       "mlp.fc1", "mlp.fc2")


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, not {family!r}")


def _cfg(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def te_prefix(family: str, component: str) -> str:
    """The kohya prefix of a text encoder: ``lora_te`` (SD1.x/SD2.x), ``lora_te1``/``lora_te2`` (SDXL)."""
    if component not in TE_COMPONENTS:
        raise ValueError(f"unknown text encoder {component!r}")
    if family == "sdxl":
        return "lora_te1" if component == "text_encoder" else "lora_te2"
    if component == "text_encoder_2":
        raise ValueError(f"a {family} model has no text_encoder_2")
    return "lora_te"


# --- SDXL: diffusers block names -> SAI (SGM) block names ---------------------------------------------
def sai_block_map(unet_config: Any) -> dict[str, str]:
    """``{diffusers module prefix: SAI module prefix}`` for a ``UNet2DConditionModel`` config.

    input_blocks: 0 is conv_in, then per down block ``layers_per_block`` entries ``[resnet, attention]``
    and, except after the last block, one ``[downsampler (op)]``. middle_block: resnet, attention, resnet.
    output_blocks: per up block ``layers + 1`` entries ``[resnet, attention, upsampler]`` (the upsampler
    sits at index 1 in a block without attention, and only in the block's last entry).
    """
    down = list(_cfg(unet_config, "down_block_types"))
    up = list(_cfg(unet_config, "up_block_types"))
    lpb = _cfg(unet_config, "layers_per_block", 2)
    layers = list(lpb) if isinstance(lpb, (list, tuple)) else [int(lpb)] * len(down)
    out = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
           "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    i = 1
    for b, block_type in enumerate(down):
        for j in range(layers[b]):
            out[f"down_blocks.{b}.resnets.{j}"] = f"input_blocks.{i}.0"
            if "CrossAttn" in block_type:
                out[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{i}.1"
            i += 1
        if b < len(down) - 1:
            out[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{i}.0.op"
            i += 1
    mid_type = _cfg(unet_config, "mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type:
        out["mid_block.resnets.0"] = "middle_block.0"
        if "CrossAttn" in mid_type:
            out["mid_block.attentions.0"] = "middle_block.1"
            out["mid_block.resnets.1"] = "middle_block.2"
        else:
            out["mid_block.resnets.1"] = "middle_block.1"
    i = 0
    up_layers = list(reversed(layers))
    for b, block_type in enumerate(up):
        attn = "CrossAttn" in block_type
        for j in range(up_layers[b] + 1):
            out[f"up_blocks.{b}.resnets.{j}"] = f"output_blocks.{i}.0"
            if attn:
                out[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{i}.1"
            if j == up_layers[b] and b < len(up) - 1:
                out[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{i}.{2 if attn else 1}.conv"
            i += 1
    return out


sgm_block_map = sai_block_map  # the name diffusers uses for the SAI layout


def _to_sai(module: str, block_map: Mapping[str, str]) -> str:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in block_map:
            rest = parts[n:]
            if ".resnets." in f".{prefix}." and rest and rest[0] in _RESNET_CHILDREN:
                rest = _RESNET_CHILDREN[rest[0]].split(".") + rest[1:]
            return ".".join([block_map[prefix]] + rest)
    raise ValueError(f"UNet module '{module}' has no SAI (SDXL) name; it is outside the UNet's block layout")


# --- module names ---------------------------------------------------------------------------------
def unet_kohya_name(module: str, family: str, block_map: Mapping[str, str] | None = None) -> str:
    """``lora_unet_...`` for a diffusers UNet module path (``block_map`` required for SDXL)."""
    if family == "sdxl":
        if block_map is None:
            raise ValueError("SDXL needs the UNet block map (pass unet_config)")
        module = _to_sai(module, block_map)
    return "lora_unet_" + module.replace(".", "_")


def te_kohya_name(module: str, family: str, component: str = "text_encoder") -> str:
    """``lora_te_text_model_...`` for a CLIP text encoder module path (with or without ``text_model.``)."""
    if module.startswith("text_model."):
        module = module[len("text_model."):]
    if module.startswith(("encoder.", "embeddings.")) or module == "final_layer_norm":
        module = "text_model." + module
    return f"{te_prefix(family, component)}_" + module.replace(".", "_")



def _split_peft_key(key: str) -> tuple[str, str]:
    for suffix in _PEFT_SUFFIX:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    raise ValueError(f"'{key}' is not a LoRA A/B weight; only plain LoRA (no DoRA, no bias) can be exported")


def _alpha_for(alpha: float | Mapping[str, float], component: str, module: str) -> float:
    if isinstance(alpha, Mapping):
        for key in (f"{component}.{module}", module if component == "unet" else None):
            if key is not None and key in alpha:
                return float(alpha[key])
        raise KeyError(f"no alpha given for {component}.{module}")
    return float(alpha)


def peft_to_kohya(unet_state: Mapping[str, torch.Tensor], text_encoder_states: Mapping[str, Mapping[str, torch.Tensor]],
                  family: str, alpha: float | Mapping[str, float], *, unet_config: Any = None,
                  dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Kohya/A1111 state dict from PEFT state dicts (``get_peft_model_state_dict`` of each model).

    ``unet_config`` (``pipe.unet.config``) is required for SDXL: the SAI block numbers depend on the
    UNet's layout. Weights are stored in ``dtype`` (fp16 by default, as kohya does); each ``.alpha`` is
    a float32 scalar so an alpha such as 0.1 keeps its exact value.
    """
    _check_family(family)
    block_map = None
    if family == "sdxl":
        if unet_config is None:
            raise ValueError("peft_to_kohya needs unet_config for SDXL (the SAI block numbers depend on the "
                             "UNet layout): pass unet_config=pipe.unet.config")
        block_map = sai_block_map(unet_config)
    out: dict[str, torch.Tensor] = {}
    parts = [("unet", unet_state)] + [(c, (text_encoder_states or {}).get(c) or {}) for c in TE_COMPONENTS]
    for component, state in parts:
        for key, tensor in state.items():
            module, suffix = _split_peft_key(key)
            if component == "unet":
                name = unet_kohya_name(module, family, block_map)
            else:
                name = te_kohya_name(module, family, component)
            full = f"{name}.{_PEFT_SUFFIX[suffix]}"
            if full in out:
                raise ValueError(f"two modules map to the same kohya key {full}")
            out[full] = tensor.detach().to("cpu", dtype).contiguous()
            if suffix == "lora_A.weight":
                out[f"{name}.alpha"] = torch.tensor(_alpha_for(alpha, component, module), dtype=torch.float32)
    log.debug("peft_to_kohya: %d modules", sum(k.endswith(".alpha") for k in out))
    return out


# --- the inverse ----------------------------------------------------------------------------------
def _is_adapter_part(name: str) -> bool:
    return any(p in name for p in ("lora_", "base_layer", "lora_dropout", "lora_magnitude"))


def _freeze(value: Any) -> Any:
    return tuple(_freeze(v) for v in value) if isinstance(value, (list, tuple)) else value


@functools.lru_cache(maxsize=8)
def _meta_unet_modules(config_items: tuple) -> tuple[str, ...]:
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in config_items if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return tuple(n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))


def unet_module_names(unet_config: Any) -> tuple[str, ...]:
    """Linear/Conv2d module paths of a UNet with this config (built on the meta device: no memory)."""
    items = dict(unet_config) if isinstance(unet_config, Mapping) else dict(vars(unet_config))
    return _meta_unet_modules(tuple(sorted((k, _freeze(v)) for k, v in items.items())))


@functools.lru_cache(maxsize=4)
def clip_has_text_model_level(class_name: str) -> bool:
    """Whether the installed transformers' ``class_name`` (CLIPTextModel...) nests its layers in ``text_model``."""
    import transformers

    config = transformers.CLIPTextConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=1, max_position_embeddings=4, projection_dim=8,
                                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    with torch.device("meta"):
        model = getattr(transformers, class_name)(config)
    return any(n == "text_model" for n, _ in model.named_children())


def default_te_layouts() -> dict[str, bool]:
    """``{component: has a text_model. level}`` for SD's CLIPTextModel and SDXL's CLIPTextModelWithProjection."""
    return {"text_encoder": clip_has_text_model_level("CLIPTextModel"),
            "text_encoder_2": clip_has_text_model_level("CLIPTextModelWithProjection")}


def _te_lookup(names: set[str], family: str, layouts: Mapping[str, bool]) -> dict[str, tuple[str, str]]:
    lookup: dict[str, tuple[str, str]] = {}
    for component in TE_COMPONENTS:
        if family != "sdxl" and component == "text_encoder_2":
            continue
        # accept either spelling of the first encoder's prefix (lora_te_ / lora_te1_)
        prefixes = ("lora_te", "lora_te1") if component == "text_encoder" else ("lora_te2",)
        found = [n for n in names if n.startswith(tuple(p + "_" for p in prefixes))]
        layers = sorted({int(m.group(1)) for n in found for m in [re.search(r"_encoder_layers_(\d+)_", n)] if m})
        modules = [f"encoder.layers.{i}.{m}" for i in layers for m in _CLIP_LAYER_MODULES] + ["text_projection"]
        for module in modules:
            nested = layouts.get(component) and module != "text_projection"
            peft_module = "text_model." + module if nested else module
            kohya_tail = te_kohya_name(module, family, component).split("_", 2)[2]
            for prefix in prefixes:
                lookup[f"{prefix}_{kohya_tail}"] = (component, peft_module)
    return lookup


def kohya_to_peft(state: Mapping[str, torch.Tensor], family: str, unet_config: Any = None, *,
                  unet_modules: Iterable[str] | None = None, te_layouts: Mapping[str, bool] | None = None,
                  ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], dict[str, float]]:
    """Split a kohya state dict into PEFT state dicts: ``(unet, {"text_encoder": .., "text_encoder_2": ..}, alphas)``.

    UNet names are resolved exactly against the module paths of a UNet with ``unet_config`` (or the
    given ``unet_modules``). Text encoder keys get a ``text_model.`` level where ``te_layouts`` (default:
    the installed transformers' classes) says the model has one. Tensors keep their stored dtype.
    ``alphas`` is keyed ``"<component>.<module path>"``; a module without ``.alpha`` gets alpha = rank.
    Raises ``ValueError`` naming the first key that matches no module.
    """
    _check_family(family)
    if unet_modules is None:
        if unet_config is None:
            raise ValueError("kohya_to_peft needs unet_config (or unet_modules) to resolve UNet module names")
        unet_modules = unet_module_names(unet_config)
    if family == "sdxl" and unet_config is None:
        raise ValueError("kohya_to_peft needs unet_config for SDXL (SAI block names)")
    block_map = sai_block_map(unet_config) if family == "sdxl" else None
    lookup: dict[str, tuple[str, str]] = {}
    for module in unet_modules:
        module = module.removesuffix(".base_layer")  # a module wrapped by a PEFT adapter
        if not _is_adapter_part(module):
            try:
                lookup[unet_kohya_name(module, family, block_map)] = ("unet", module)
            except ValueError:
                continue
    layouts = default_te_layouts() if te_layouts is None else te_layouts
    lookup.update(_te_lookup({k.split(".", 1)[0] for k in state}, family, layouts))
    unet_sd: dict[str, torch.Tensor] = {}
    te_sds: dict[str, dict[str, torch.Tensor]] = {c: {} for c in TE_COMPONENTS}
    alphas: dict[str, float] = {}
    unknown = sorted({k.partition(".")[0] for k in state} - set(lookup))
    if unknown:
        looks_xl = any(n.startswith("lora_te2_") or "_input_blocks_" in n or "_output_blocks_" in n for n in unknown)
        hint = "; it looks like an SDXL LoRA" if looks_xl and family != "sdxl" else ""
        raise ValueError(f"{len(unknown)} of its modules match no module of this {family} model "
                         f"(first: {unknown[0]}){hint}")
    for key, tensor in state.items():
        name, _, suffix = key.partition(".")
        component, module = lookup[name]
        if suffix == "alpha":
            alphas[f"{component}.{module}"] = float(tensor.item())
            continue
        if suffix not in _KOHYA_SUFFIX:
            raise ValueError(f"kohya key '{key}': only lora_down/lora_up/alpha are supported (not LoCon/LoHa)")
        (unet_sd if component == "unet" else te_sds[component])[f"{module}.{_KOHYA_SUFFIX[suffix]}"] = tensor
        if suffix == "lora_down.weight":
            alphas.setdefault(f"{component}.{module}", float(tensor.shape[0]))
    return unet_sd, te_sds, alphas


# --- the file ---------------------------------------------------------------------------------------
def save_kohya_lora(path: str | Path, kohya_state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    """Write the kohya file atomically with ``sshs_model_hash`` / ``sshs_legacy_hash`` in its metadata.

    The model hash is the sha256 of the bytes after the safetensors header, which depend only on the
    tensors, so it is computed from a serialization in memory; the written file is hashed again to be sure
    it is what A1111 computes.
    """
    from .metadata import kohya_hashes, model_hash

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in kohya_state.items()}
    meta = {str(k): str(v) for k, v in metadata.items()}
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = kohya_hashes(tensors, meta)
    path = atomic_save_safetensors(path, tensors, meta)
    written = model_hash(path)
    if written != meta["sshs_model_hash"]:  # only if safetensors changed its layout; never ship a wrong hash
        raise RuntimeError(f"{path.name}: sshs_model_hash {meta['sshs_model_hash']} does not match the file "
                           f"({written})")
    log.info("wrote %s (%d tensors, sshs_model_hash %s)", path, len(tensors), written[:12])
    return path
