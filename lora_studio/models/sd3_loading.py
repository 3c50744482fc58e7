"""Load SD3 / SD3.5 pipelines and transformers: a diffusers folder, a hub id, or one single-file checkpoint.

    pipe = load_sd3_pipeline("stabilityai/stable-diffusion-3.5-large", "sd3")
    pipe = load_sd3_pipeline("sd3.5_medium.safetensors", "sd3", single_file_config="/models/sd3.5-medium")
    model_render_defaults("/models/sd3.5-large-turbo", "sd3")      # {"steps": 4, "cfg": 0.0}

A single file is Stability's layout (``model.diffusion_model.joint_blocks.*``); its transformer is converted by
diffusers' ``from_single_file``, and the VAE, text encoders, tokenizers and configs come from ``single_file_config``
(a diffusers folder or hub id of SD3.5) or else the released model of the same size on the hub (``DEFAULT_CONFIG``;
gated: accept its licence and log in once), as for FLUX.1 files: a VAE or text encoders inside the file are not
read (the released ones are the same). Render settings differ
by model: Large 28 steps / CFG 3.5, Medium 40 / 4.5 (its MMDiT-X blocks have a second attention ``attn2``),
Large Turbo 4 / 0 (told by its name). Every load holds the process-wide model-loading lock.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..families import get_family
from .flux_loading import _source
from .transformer_loading import load_pipeline_files, load_transformer_files, read_transformer_config

DEFAULT_CONFIG = {"large": "stabilityai/stable-diffusion-3.5-large",
                  "medium": "stabilityai/stable-diffusion-3.5-medium"}
MEDIUM_KEY = "joint_blocks.0.x_block.attn2.qkv.weight"  # SD3.5 Medium's MMDiT-X: a second attention
RENDER = {"large": {"steps": 28, "cfg": 3.5}, "medium": {"steps": 40, "cfg": 4.5}, "turbo": {"steps": 4, "cfg": 0.0}}


# --- which model, and its render settings -----------------------------------------------------------------
def _single_file_is_medium(path: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return any(k.endswith(MEDIUM_KEY) for k in fh.keys())


def model_kind(base_model: str, transformer_config: Any = None) -> str:
    """``large``, ``medium`` or ``turbo`` (Large Turbo, told by its name) of a model's files or loaded config."""
    if "turbo" in str(base_model).lower():
        return "turbo"
    path = Path(base_model).expanduser()
    if transformer_config is None and path.is_file():
        return "medium" if _single_file_is_medium(path) else "large"
    config = transformer_config if transformer_config is not None else read_transformer_config(base_model)
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    if not config and "medium" in str(base_model).lower():
        return "medium"
    return "medium" if get("dual_attention_layers", ()) else "large"


def model_variant(base_model: str, family: str = "sd3") -> str:
    """"medium" for SD3.5 Medium, "" for Large and Large Turbo (the registry's ``variant`` hook: memory figures
    and presets)."""
    return "medium" if model_kind(base_model) == "medium" else ""


def model_render_defaults(base_model: str, family: str = "sd3") -> dict[str, float]:
    """``{"steps", "cfg"}`` for a model's files (the registry's ``render_defaults`` hook for sd3)."""
    return dict(RENDER[model_kind(base_model)])


def render_defaults(base_model: str, transformer_config: Any) -> dict[str, Any]:
    """``guidance_scale`` and ``num_inference_steps`` for a loaded model (the trainer's sample images)."""
    found = RENDER[model_kind(base_model, transformer_config)]
    return {"guidance_scale": found["cfg"], "num_inference_steps": found["steps"]}


# --- loading ----------------------------------------------------------------------------------------------
def config_source(path: Path, single_file_config: str | None) -> str:
    """Where a single file's configs, tokenizers and missing parts come from."""
    if single_file_config:
        return _source(single_file_config)
    return DEFAULT_CONFIG["medium" if _single_file_is_medium(path) else "large"]


SINGLE_FILE_HINT = ("A single-file checkpoint takes its VAE, text encoders, tokenizers and configs from "
                    "the hub the first time (SD3.5 is gated: accept its licence on the hub and log in), or set "
                    "single_file_config to a diffusers folder of SD3.5.")


def load_sd3_pipeline(base_model: str, family: str = "sd3", *, torch_dtype=None, single_file_config: str | None = None,
                      transformer=None, without_transformer: bool = False,
                      report: Callable[[str], None] | None = None):
    """A ``StableDiffusion3Pipeline``; ``transformer`` replaces the model's own (already loaded);
    ``without_transformer`` leaves it out (the trainer loads it after caching, quantized as asked). A single file
    gives the transformer, the configuration source the rest."""
    path = Path(base_model).expanduser()
    return load_pipeline_files(
        lambda source: get_family(family).pipeline_class(), base_model, family,
        file_config=lambda: config_source(path, single_file_config),
        load_transformer=lambda: load_sd3_transformer(base_model, family, torch_dtype=torch_dtype,
                                                      single_file_config=single_file_config),
        torch_dtype=torch_dtype, transformer=transformer, without_transformer=without_transformer, report=report,
        single_file_hint="" if single_file_config else SINGLE_FILE_HINT)


def load_sd3_transformer(base_model: str, family: str = "sd3", *, torch_dtype=None,
                         single_file_config: str | None = None, quantization_config=None, device_map=None):
    """The ``SD3Transformer2DModel`` alone (folder, hub id or single file), optionally quantized while loading."""
    from diffusers import SD3Transformer2DModel

    return load_transformer_files(
        SD3Transformer2DModel, base_model, family, torch_dtype=torch_dtype, quantization_config=quantization_config,
        device_map=device_map, file_config=lambda: config_source(Path(base_model).expanduser(), single_file_config),
        single_file_hint="" if single_file_config else SINGLE_FILE_HINT)
