"""The model families LoRA Studio trains: one registry entry each, the one place a family is described.

    family = get_family("sdxl")
    family.name, family.kind                 # "SDXL", "image"
    family.default_resolution                # 1024
    family.default_targets                   # ("to_q", "to_k", "to_v", "to_out.0")
    family.preset_group                      # presets/*.yaml whose preset_info.family is this ("sdxl")
    family.trainer_class()                   # the Trainer subclass (imported when asked)
    family.pipeline_class()                  # the diffusers pipeline the export check and Testing tab use
    get_family("flux").render_settings(path) # {"steps": 4, "cfg": 0.0} for a schnell model (its hook)
    get_family("flux2").variant_of(path)     # "dev", "klein9b" or "" (klein 4B): its memory figures and presets

Detection (``models/detect.py``) asks every entry whether a diffusers ``model_index.json``
(``matches_index``) or the tensor names of a single-file checkpoint (``matches_keys``) are its own. Adding a
family = one trainer module + one ``Family(...)`` entry below (see README, "Adding a model family"); what the
fields cannot say, optional ``"module:function"`` hooks do (``pipeline_loader``, ``render_defaults``, ``variant``).
This module imports nothing heavy and nothing else of the project, so everything may import it.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

SD_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
CLIP_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
# FLUX.1 / Chroma transformer blocks: q, k, v and out of the image and text streams (lora_targets: attention)
FLUX_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                  "attn.add_v_proj", "attn.to_add_out")
# ... and (lora_targets: all_linear) the feed-forward layers and the single blocks' MLP and output projections
FLUX_ALL_LINEAR = FLUX_ATTENTION + ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
                                    "proj_mlp", "proj_out")
# SD3 / SD3.5 MMDiT blocks: q, k, v and out of both streams, and of SD3.5 Medium's second attention (attn2)
SD3_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                 "attn.add_v_proj", "attn.to_add_out", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
SD3_ALL_LINEAR = SD3_ATTENTION + ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
# FLUX.2 (klein, dev) blocks: both streams' attention; a single block's fused q, k, v + MLP input projection
FLUX2_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                   "attn.add_v_proj", "attn.to_add_out", "attn.to_qkv_mlp_proj")
FLUX2_ALL_LINEAR = FLUX2_ATTENTION + ("ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
                                      "attn.to_out")
# Qwen-Image blocks: q, k, v and out of the image and text streams; all_linear adds both streams' feed-forward layers
QWEN_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                  "attn.add_v_proj", "attn.to_add_out")
QWEN_ALL_LINEAR = QWEN_ATTENTION + ("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
# Z-Image main layers: q, k, v and out of the single-stream attention; all_linear adds the feed-forward layers
Z_IMAGE_ATTENTION = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
Z_IMAGE_ALL_LINEAR = Z_IMAGE_ATTENTION + ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


@dataclass(frozen=True)
class TextLimit:
    """The tokens of a caption a family's text encoder reads; what follows is cut in training."""

    encoder: str      # the name a creator knows ("CLIP", "T5", "Qwen3")
    tokens: int       # what the pipeline reads
    subfolder: str    # where a diffusers folder keeps that encoder's tokenizer
    kind: str         # "clip", "t5" or "qwen": how to estimate the count without the tokenizer


CLIP_77 = TextLimit("CLIP", 77, "tokenizer", "clip")
T5_512 = TextLimit("T5", 512, "tokenizer_2", "t5")


@dataclass(frozen=True)
class Family:
    id: str                                   # the model_family key
    name: str                                 # for people
    kind: str                                 # "image" or "text"
    trainer: str                              # "module:Class" of its Trainer, imported lazily
    pipeline: str | None = None               # "module:Class" of the inference pipeline (images)
    default_resolution: int | None = None
    default_targets: tuple[str, ...] = ()     # target_modules when the config leaves it empty
    text_encoder_targets: tuple[str, ...] = ()
    target_choices: tuple[str, ...] = ()      # layer names the Training tab offers (empty: default_targets)
    targets_help: str = ""                    # what an empty target_modules means, when not default_targets
    settings_group: str = ""                  # the config group (config.py group=) the Training tab unfolds
    preset_group: str = ""                    # presets/*.yaml with preset_info.family == this
    formats: tuple[str, ...] = ()             # files the export writes: kohya, diffusers, peft ...
    kohya_version: str = ""                   # ss_base_model_version in the kohya file
    sample_steps: int = 20                    # Testing tab / generate defaults
    guidance_scale: float = 7.5
    half_dtype: str = "float16"               # half precision it renders in on a GPU ("bfloat16": fp16 overflows)
    short_name: str = ""                      # in short messages ("SD1.5"); empty: name
    caption_style: str = "short"              # tags, short or detailed: what its text encoder was trained on
    text_limit: TextLimit | None = CLIP_77    # captions longer than this are cut by its text encoder
    matches_index: Callable[[dict[str, Any], Path], bool] | None = None
    matches_keys: Callable[[set[str]], bool] | None = None
    # "module:function" hooks, for a family whose needs the fields above do not cover:
    pipeline_loader: str | None = None        # (base_model, family, *, torch_dtype, single_file_config, report)
    #                                           -> pipeline, instead of the class's from_pretrained/from_single_file
    render_defaults: str | None = None        # (base_model, family) -> {"steps", "cfg"}: render settings that
    #                                           differ by model within the family (FLUX.1-dev vs schnell)
    variant: str | None = None                # (base_model) -> "" or a variant's name ("dev"): the family's models
    #                                           differ in size (FLUX.2 klein 4B, 9B, dev): its memory figures and
    #                                           presets (``preset_info.variant``)
    notes: dict[str, Any] = field(default_factory=dict)

    def trainer_class(self) -> type:
        return _load(self.trainer)

    def pipeline_class(self) -> type | None:
        return _load(self.pipeline) if self.pipeline else None

    def hook(self, name: str) -> Callable[..., Any] | None:
        """The function a ``"module:function"`` field (``pipeline_loader``, ``render_defaults``) names, or None."""
        path = getattr(self, name)
        return _load(path) if path else None

    def render_settings(self, base_model: str) -> dict[str, float] | None:
        """``{"steps", "cfg"}`` to render ``base_model`` with, for a family whose render settings differ by model
        (its ``render_defaults`` hook, which starts from ``sample_steps`` / ``guidance_scale``); None for the
        others (the caller keeps its own)."""
        hook = self.hook("render_defaults")
        return hook(base_model, self.id) if hook else None

    def variant_of(self, base_model: str | None) -> str:
        """Which of the family's models ``base_model`` is ("" for the one its figures and presets describe first,
        or a family without variants), from its ``variant`` hook."""
        hook = self.hook("variant")
        return hook(base_model) if hook and base_model else ""

    @property
    def is_image(self) -> bool:
        return self.kind == "image"

    @property
    def label(self) -> str:
        """The short name people use in messages ("SD1.5", "FLUX.1")."""
        return self.short_name or self.name


def _load(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


# --- detection rules (each says yes for its own family only, whatever the order they are asked in) ------------
def _is_sdxl_index(index: dict[str, Any], folder: Path) -> bool:
    return "unet" in index and ("text_encoder_2" in index or "XL" in str(index.get("_class_name", "")))


def _is_sd2_index(index: dict[str, Any], folder: Path) -> bool:
    if "unet" not in index or "vae" not in index or _is_sdxl_index(index, folder):
        return False
    unet = _json(folder / "unet" / "config.json")
    sched = _json(folder / "scheduler" / "scheduler_config.json")
    return unet.get("cross_attention_dim") == 1024 or sched.get("prediction_type") == "v_prediction"


def _is_sd15_index(index: dict[str, Any], folder: Path) -> bool:
    return ("unet" in index and "vae" in index and not _is_sdxl_index(index, folder)
            and not _is_sd2_index(index, folder))


def _is_sdxl_keys(keys: set[str]) -> bool:
    return any(k.startswith("conditioner.embedders.1") for k in keys)


def _is_sd2_keys(keys: set[str]) -> bool:
    return any("cond_stage_model.model." in k for k in keys)


def _is_sd15_keys(keys: set[str]) -> bool:
    return (any(k.startswith("model.diffusion_model.input_blocks") for k in keys) and not _is_sdxl_keys(keys)
            and not _is_sd2_keys(keys))


# FLUX.1 / Chroma: a diffusers folder names its pipeline class; a single file is the transformer in Black Forest
# Labs' layout (``double_blocks.*``, optionally under ``model.diffusion_model.``), Chroma's with its own
# ``distilled_guidance_layer`` instead of FLUX.1's time/text/guidance embedders. A LoRA file in that layout
# (``.lora_`` keys) is neither.
BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def _bfl_names(keys: set[str]) -> set[str]:
    if any(".lora_" in k or k.startswith("lora_") for k in keys):
        return set()
    return {next((k[len(p):] for p in BFL_PREFIXES if k.startswith(p)), k) for k in keys}


def _is_flux_index(index: dict[str, Any], folder: Path) -> bool:
    return index.get("_class_name") == "FluxPipeline"


def _is_chroma_index(index: dict[str, Any], folder: Path) -> bool:
    return index.get("_class_name") == "ChromaPipeline"


def _is_chroma_keys(keys: set[str]) -> bool:
    names = _bfl_names(keys)
    return any(k.startswith("double_blocks.") for k in names) and \
        any(k.startswith("distilled_guidance_layer.") for k in names)


def _is_flux_keys(keys: set[str]) -> bool:
    names = _bfl_names(keys)
    return any(k.startswith("double_blocks.") for k in names) and \
        not any(k.startswith("distilled_guidance_layer.") for k in names) and not _is_flux2_keys(keys)


# FLUX.2: its pipeline classes; a single file in BFL's layout has modulations shared by all blocks of a stream
def _is_flux2_index(index: dict[str, Any], folder: Path) -> bool:
    return index.get("_class_name") in ("Flux2Pipeline", "Flux2KleinPipeline")


def _is_flux2_keys(keys: set[str]) -> bool:
    return any(k.startswith("double_stream_modulation_img.") for k in _bfl_names(keys))


# SD3 / SD3.5: the pipeline class; a single file in Stability's layout (MMDiT ``joint_blocks.*``).
def _is_sd3_index(index: dict[str, Any], folder: Path) -> bool:
    return index.get("_class_name") == "StableDiffusion3Pipeline"


def _is_sd3_keys(keys: set[str]) -> bool:
    return any(k.startswith("joint_blocks.") for k in _bfl_names(keys))


# Qwen-Image / Z-Image: a diffusers folder names its pipeline class; a single file is the transformer as ComfyUI
# publishes it (Qwen-Image in diffusers' names with its text-norm ``txt_norm``; Z-Image in its original layout,
# with the noise and context refiners), optionally under ``model.diffusion_model.``.
def _is_qwen_image_index(index: dict[str, Any], folder: Path) -> bool:
    return index.get("_class_name") == "QwenImagePipeline"


def _is_qwen_image_keys(keys: set[str]) -> bool:
    names = _bfl_names(keys)
    return {"txt_norm.weight", "img_in.weight"} <= names and any(".img_mod." in k for k in names)


def _is_z_image_index(index: dict[str, Any], folder: Path) -> bool:
    return index.get("_class_name") == "ZImagePipeline"


def _is_z_image_keys(keys: set[str]) -> bool:
    names = _bfl_names(keys)
    return any(k.startswith("noise_refiner.") for k in names) and any(k.startswith("context_refiner.") for k in names)


# --- the registry ------------------------------------------------------------------------------------------
_SD = dict(kind="image", trainer="lora_studio.training.diffusion:DiffusionTrainer",
           pipeline="diffusers:StableDiffusionPipeline", default_targets=SD_ATTENTION,
           text_encoder_targets=CLIP_ATTENTION, preset_group="sd15", formats=("kohya", "diffusers"))

# FLUX.1 and Chroma share the flow-matching trainer, the presets and the LoRA file form (transformer.* keys with
# alphas, which ComfyUI, Forge and diffusers load); a FLUX.1 model's steps and guidance depend on whether it is
# guidance-distilled (dev 28 / 3.5, schnell 4 / 0), which the render_defaults hook reads from its files.
_FLOW = dict(kind="image", default_resolution=1024, default_targets=FLUX_ATTENTION, target_choices=FLUX_ALL_LINEAR,
             targets_help="Transformer layers that get a LoRA, in every kept block (Enter adds one). Empty: the "
                          "lora_targets preset (attention, or all_linear) under 'Flow-matching transformers'.",
             settings_group="flow", preset_group="flux", formats=("diffusers",), half_dtype="bfloat16",
             caption_style="detailed", text_limit=T5_512,
             pipeline_loader="lora_studio.models.flux_loading:load_flux_pipeline",
             render_defaults="lora_studio.models.flux_loading:model_render_defaults")

FAMILIES: dict[str, Family] = {f.id: f for f in (
    Family("sd15", "Stable Diffusion 1.x", short_name="SD1.5", default_resolution=512, kohya_version="sd_v1",
           matches_index=_is_sd15_index, matches_keys=_is_sd15_keys, **_SD),
    Family("sd2", "Stable Diffusion 2.x", short_name="SD2", default_resolution=768, kohya_version="sd_v2",
           matches_index=_is_sd2_index, matches_keys=_is_sd2_keys, **_SD),
    Family("sdxl", "SDXL", kind="image", trainer="lora_studio.training.sdxl:SDXLTrainer",
           pipeline="diffusers:StableDiffusionXLPipeline", default_resolution=1024, default_targets=SD_ATTENTION,
           text_encoder_targets=CLIP_ATTENTION, preset_group="sdxl", formats=("kohya", "diffusers"),
           kohya_version="sdxl_base_v1-0", sample_steps=30, guidance_scale=7.0,
           matches_index=_is_sdxl_index, matches_keys=_is_sdxl_keys),
    Family("flux", "FLUX.1", trainer="lora_studio.training.flux:FluxTrainer",
           pipeline="diffusers:FluxPipeline", kohya_version="flux1", sample_steps=28, guidance_scale=3.5,
           matches_index=_is_flux_index, matches_keys=_is_flux_keys, **_FLOW),
    Family("chroma", "Chroma", trainer="lora_studio.training.flux:ChromaTrainer",
           pipeline="diffusers:ChromaPipeline", kohya_version="chroma", sample_steps=35, guidance_scale=5.0,
           matches_index=_is_chroma_index, matches_keys=_is_chroma_keys,
           **{**_FLOW, "text_limit": TextLimit("T5", 512, "tokenizer", "t5")}),
    Family("sd3", "SD3.5", trainer="lora_studio.training.sd3:SD3Trainer",
           pipeline="diffusers:StableDiffusion3Pipeline", kohya_version="sd3", sample_steps=28, guidance_scale=3.5,
           matches_index=_is_sd3_index, matches_keys=_is_sd3_keys,
           **{**_FLOW, "default_targets": SD3_ATTENTION, "target_choices": SD3_ALL_LINEAR, "preset_group": "sd3",
              "text_limit": TextLimit("T5", 256, "tokenizer_3", "t5"),
              "targets_help": "Transformer layers that get a LoRA, in every kept block "
              "(Enter adds one). Empty: the lora_targets preset (attention, or all_linear).",
              "pipeline_loader": "lora_studio.models.sd3_loading:load_sd3_pipeline",
              "render_defaults": "lora_studio.models.sd3_loading:model_render_defaults",
              "variant": "lora_studio.models.sd3_loading:model_variant"}),
    Family("flux2", "FLUX.2", trainer="lora_studio.training.flux2:Flux2Trainer",
           pipeline="diffusers:Flux2KleinPipeline", kohya_version="flux2", sample_steps=50, guidance_scale=4.0,
           matches_index=_is_flux2_index, matches_keys=_is_flux2_keys,
           **{**_FLOW, "default_targets": FLUX2_ATTENTION, "target_choices": FLUX2_ALL_LINEAR, "preset_group": "flux2",
              "text_limit": TextLimit("Qwen3 (dev: Mistral)", 512, "tokenizer", "qwen"),
              "targets_help": "Transformer layers that get a LoRA, in every kept block (Enter adds one). Empty: the "
              "lora_targets preset (attention, or all_linear).",
              "pipeline_loader": "lora_studio.models.flux2_loading:load_flux2_pipeline",
              "render_defaults": "lora_studio.models.flux2_loading:model_render_defaults",
              "variant": "lora_studio.models.flux2_loading:model_variant"}),
    Family("qwen_image", "Qwen-Image", kind="image", trainer="lora_studio.training.qwen_image:QwenImageTrainer",
           pipeline="diffusers:QwenImagePipeline", default_resolution=1024, default_targets=QWEN_ATTENTION,
           target_choices=QWEN_ALL_LINEAR, targets_help="Transformer layers that get a LoRA, in every kept block "
           "(Enter adds one). Empty: the lora_targets preset (attention, or all_linear).", settings_group="flow",
           preset_group="qwen_image", formats=("diffusers",), kohya_version="qwen_image", sample_steps=50,
           guidance_scale=4.0, half_dtype="bfloat16", caption_style="detailed",
           text_limit=TextLimit("Qwen2.5-VL", 512, "tokenizer", "qwen"),
           matches_index=_is_qwen_image_index, matches_keys=_is_qwen_image_keys,
           pipeline_loader="lora_studio.models.flow_loading:load_flow_pipeline",
           render_defaults="lora_studio.training.qwen_image:qwen_render_defaults", notes={"true_cfg": True}),
    Family("z_image", "Z-Image", kind="image", trainer="lora_studio.training.z_image:ZImageTrainer",
           pipeline="diffusers:ZImagePipeline", default_resolution=1024, default_targets=Z_IMAGE_ATTENTION,
           target_choices=Z_IMAGE_ALL_LINEAR, targets_help="Transformer layers that get a LoRA, in every kept main "
           "layer (Enter adds one). Empty: the lora_targets preset (attention, or all_linear).", settings_group="flow",
           preset_group="z_image", formats=("diffusers",), kohya_version="z_image", sample_steps=9, guidance_scale=0.0,
           half_dtype="bfloat16", caption_style="detailed", text_limit=TextLimit("Qwen3", 512, "tokenizer", "qwen"),
           matches_index=_is_z_image_index,
           matches_keys=_is_z_image_keys, pipeline_loader="lora_studio.models.flow_loading:load_flow_pipeline",
           render_defaults="lora_studio.training.z_image:z_image_render_defaults"),
    Family("llm", "causal language model", kind="text", trainer="lora_studio.training.llm:LLMTrainer",
           default_targets=("q_proj", "v_proj"), settings_group="llm", preset_group="llm", formats=("peft",),
           text_limit=None),
)}

FAMILY_IDS: tuple[str, ...] = tuple(FAMILIES)


def get_family(family_id: str) -> Family:
    """The registry entry; ``KeyError`` with the known ids for an unknown one."""
    try:
        return FAMILIES[family_id]
    except KeyError:
        raise KeyError(f"unknown model family {family_id!r}; known: {', '.join(FAMILIES)}") from None


def image_families() -> list[Family]:
    return [f for f in FAMILIES.values() if f.is_image]
