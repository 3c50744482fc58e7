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

The other network types (``networks.py``) use the LyCORIS names on the same module keys, which A1111/Forge
(built-in LyCORIS support) and ComfyUI (``comfy/weight_adapter``) read:

- DoRA: ``lora_down``/``lora_up``/``alpha`` plus ``dora_scale`` (the magnitude, shape ``(1, in)``, ``(1, in, 1, 1)``
  for a convolution: the input-axis decomposition those tools apply; kept in float32).
- LoKr: ``lokr_w1`` and ``lokr_w2`` or ``lokr_w2_a``/``lokr_w2_b`` (``lokr_w1_a``/``_b``, ``lokr_t2``), ``alpha``.
  The tools scale by alpha / rank only when a factor is split in two (the rank is its inner size); with both
  factors full they use scale 1, so ``peft_to_kohya`` folds PEFT's alpha / rank into ``lokr_w2`` then.
- LoHa: ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` (``hada_t1``/``hada_t2``), ``alpha``; scale alpha /
  rank with rank = ``hada_w1_b``'s first size.
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
LYCORIS_NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
                 "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
# PEFT state-dict suffix -> kohya/LyCORIS suffix (LoKr/LoHa tensors have the same names in both)
_PEFT_SUFFIX = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
                "lora_magnitude_vector": "dora_scale", **{n: n for n in LYCORIS_NAMES}}
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
    raise ValueError(f"'{key}' is not a LoRA, DoRA, LoKr or LoHa weight (a bias or another adapter type cannot be "
                     "exported)")


def _per_module(alpha: float | Mapping[str, float] | None, component: str, module: str) -> float | None:
    if alpha is None or not isinstance(alpha, Mapping):
        return None if alpha is None else float(alpha)
    for key in (f"{component}.{module}", module if component == "unet" else None):
        if key is not None and key in alpha:
            return float(alpha[key])
    raise KeyError(f"no value given for {component}.{module}")




def module_rank(tensors: Mapping[str, torch.Tensor]) -> int:
    """The rank of one module's PEFT tensors (suffix -> tensor). A LoKr with two full factors has none: the
    larger side of ``lokr_w2`` is returned (a PEFT LoKr of that rank keeps ``w2`` full) and its scale is 1."""
    for name, dim in (("lora_A.weight", 0), ("hada_w1_b", 0), ("lokr_w2_b", 0), ("lokr_w1_b", 0)):
        if name in tensors:
            return int(tensors[name].shape[dim])
    if "lokr_w2" in tensors:
        return int(max(tensors["lokr_w2"].shape[:2]))
    raise ValueError(f"no rank in {sorted(tensors)}")


def lokr_is_full(tensors: Mapping[str, object]) -> bool:
    """A LoKr module whose two factors are stored whole (the tools then ignore alpha)."""
    return "lokr_w1" in tensors and "lokr_w2" in tensors


def lycoris_module(tensors: Mapping[str, torch.Tensor], alpha: float, rank: int | None,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One module's kohya/LyCORIS tensors from its PEFT tensors (suffix -> tensor): LoRA/DoRA as ``lora_down`` /
    ``lora_up`` (+ ``dora_scale``), LoKr and LoHa under their own names, and ``alpha``."""
    out: dict[str, torch.Tensor] = {}
    for suffix, tensor in tensors.items():
        value = tensor.detach().to("cpu", torch.float32)
        if suffix == "lora_magnitude_vector":  # (in,) -> (1, in) or (1, in, 1, 1)
            down = tensors.get("lora_A.weight")
            value = value.reshape(1, -1, *([1] * ((down.ndim if down is not None else 2) - 2)))
        if suffix == "lokr_w2" and lokr_is_full(tensors):
            if rank is None:
                raise ValueError("a LoKr with two full factors needs its rank to fold alpha / rank into lokr_w2")
            value = value * (alpha / rank)
        # DoRA's magnitude stays float32: in fp16 its rounding alone (~2e-4 relative) would change every column
        out[_PEFT_SUFFIX[suffix]] = value.to(torch.float32 if suffix == "lora_magnitude_vector" else dtype).contiguous()
    if any(k in tensors for k in ("lora_A.weight", "hada_w1_a", "lokr_w1", "lokr_w1_a")):
        full = lokr_is_full(tensors)
        out["alpha"] = torch.tensor(float(rank if full and rank else alpha), dtype=torch.float32)
    return out


def peft_to_kohya(unet_state: Mapping[str, torch.Tensor], text_encoder_states: Mapping[str, Mapping[str, torch.Tensor]],
                  family: str, alpha: float | Mapping[str, float], *, unet_config: Any = None,
                  dtype: torch.dtype = torch.float16, rank: int | Mapping[str, int] | None = None,
                  ) -> dict[str, torch.Tensor]:
    """Kohya/A1111 state dict from PEFT state dicts (``get_peft_model_state_dict`` of each model).

    Plain LoRA, DoRA, LoKr and LoHa tensors are written under their kohya/LyCORIS names (module doc).
    ``unet_config`` (``pipe.unet.config``) is required for SDXL: the SAI block numbers depend on the UNet's
    layout. Weights are stored in ``dtype`` (fp16 by default, as kohya does); each ``.alpha`` is a float32
    scalar so an alpha such as 0.1 keeps its exact value. ``rank`` (the adapter's configured rank) is needed
    only for LoKr modules whose two factors are full.
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
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            module, suffix = _split_peft_key(key)
            modules.setdefault(module, {})[suffix] = tensor
        for module, tensors in modules.items():
            name = (unet_kohya_name(module, family, block_map) if component == "unet"
                    else te_kohya_name(module, family, component))
            converted = lycoris_module(tensors, _per_module(alpha, component, module) or 0.0,
                                      _per_module(rank, component, module), dtype)
            for suffix, value in converted.items():
                if f"{name}.{suffix}" in out:
                    raise ValueError(f"two modules map to the same kohya key {name}.{suffix}")
                out[f"{name}.{suffix}"] = value
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
    ``alphas`` is keyed ``"<component>.<module path>"``; a module without ``.alpha`` gets alpha = rank, a LoKr
    with two full factors alpha = its ``module_rank`` (scale 1, as the tools apply it). ``dora_scale`` becomes
    the flat ``lora_magnitude_vector``.
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
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        name, _, suffix = key.partition(".")
        if suffix != "alpha" and suffix not in _KOHYA_SUFFIX:
            raise ValueError(f"kohya key '{key}': not a LoRA, DoRA, LoKr or LoHa weight (LoCon mid weights, GLoRA, "
                             "OFT and others are not supported)")
        grouped.setdefault(name, {})[suffix] = tensor
    for name, tensors in grouped.items():
        component, module = lookup[name]
        peft = {_KOHYA_SUFFIX[k]: (v.flatten() if k == "dora_scale" else v) for k, v in tensors.items() if k != "alpha"}
        (unet_sd if component == "unet" else te_sds[component]).update({f"{module}.{k}": v for k, v in peft.items()})
        if not peft:
            continue
        rank = module_rank(peft)
        file_alpha = float(tensors["alpha"].item()) if "alpha" in tensors else float(rank)
        alphas[f"{component}.{module}"] = float(rank) if lokr_is_full(peft) else file_alpha
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
