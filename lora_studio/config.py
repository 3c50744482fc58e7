"""One training configuration for every path in: YAML file, preset, UI form and command line.

``TrainConfig`` is a flat dataclass whose field names are the YAML keys creators already use
(``train_data_dir``, ``lora_rank``, ``learning_rate`` ...). Each field carries its help text and the values
it accepts, so validation, the template file and the UI's help texts come from one place.

Order of precedence when building a config: preset, then config file, then ``key=value`` overrides.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from .errors import ConfigError
from .families import FAMILY_IDS, get_family
from .fileio import atomic_write_text
from .presets import load_preset
from .yaml_files import read_yaml_mapping

FAMILIES = ("auto",) + FAMILY_IDS
MIXED_PRECISIONS = ("no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adamw_schedulefree", "adafactor")
NETWORK_TYPES = ("lora", "dora", "lokr", "loha")
LR_SCHEDULERS = (
    "cosine",
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine_with_restarts",
    "polynomial",
)
PREDICTION_TYPES = ("auto", "epsilon", "v_prediction")
CACHE_MODES = ("memory", "disk", "none")
# FLUX and the next flow-matching families (training/flow_matching.py)
TIMESTEP_SAMPLINGS = ("sigmoid", "logit_normal", "uniform", "shift", "flux_shift")
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
BASE_QUANTIZATIONS = ("none", "nf4", "int8", "fp8")
LORA_TARGET_PRESETS = ("attention", "all_linear")

# What a field holds, beyond its Python type. Paths are checked by these kinds (the shared app's path policy):
#   model   a folder, a file or a hub id (owner/name)      data    an existing file or folder to read
#   file    an existing file (or a LoRA/adapter folder)     output  a folder that is created when missing
# The others come from the type: bool, number, choice, list, text.
PATH_KINDS = ("model", "data", "file", "output")


def _opt(default: Any, help: str, *, choices: Iterable[str] | None = None, min: float | None = None,
         max: float | None = None, group: str = "main", kind: str | None = None) -> Any:
    """A dataclass field with help text, its kind and the allowed values kept in its metadata."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "min": min, "max": max,
            "group": group, "kind": kind}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything a training run needs. Field names are the YAML keys."""

    # --- what to train -------------------------------------------------------------------------------
    base_model: str = _opt("", "Base model: a diffusers folder, a hub id, or a single .safetensors checkpoint.",
                           kind="model")
    model_family: str = _opt("auto", f"{', '.join(FAMILY_IDS)}; 'auto' detects it from the model files.",
                             choices=FAMILIES)
    vae: str | None = _opt(None, "Optional VAE (folder, hub id or file), e.g. an fp16-safe SDXL VAE.",
                           group="advanced", kind="model")
    single_file_config: str | None = _opt(
        None, "For a single-file checkpoint (.safetensors/.ckpt): a diffusers folder or hub id of the same family "
        "whose configs and tokenizer it uses. Empty: the family's standard ones from the hub (a few MB, once).",
        group="advanced", kind="model")
    train_data_dir: str = _opt("", "Folder with the training images (or LLM data file/folder).", kind="data")
    metadata_path: str | None = _opt(None, "Caption table (metadata.csv). Empty: use <train_data_dir>/"
                                     "metadata.csv if present, else .txt caption files.", kind="file")
    caption_extension: str = _opt(".txt", "Extension of kohya-style caption files next to the images.",
                                  group="advanced")
    output_dir: str = _opt("output", "Folder where runs and the exported LoRA are written.", kind="output")
    output_name: str = _opt("my_lora", "File name of the exported LoRA (without extension).")

    # --- the LoRA ------------------------------------------------------------------------------------
    lora_rank: int = _opt(16, "LoRA rank (dimension). Higher keeps more detail, files get bigger.", min=1, max=1024)
    lora_alpha: float | None = _opt(None, "LoRA alpha; the effective scale is alpha/rank. Empty: equal to rank.",
                                    min=0.0)
    lora_dropout: float = _opt(0.0, "Dropout on the LoRA layers (0 to 1).", min=0.0, max=1.0, group="advanced")
    network_type: str = _opt("lora", "lora; dora (LoRA with a learned magnitude per input channel, often closer to "
                             "full fine-tuning); lokr or loha (LyCORIS Kronecker / Hadamard products: more "
                             "expressive per parameter). Images: all four; language models: lora or dora.",
                             choices=NETWORK_TYPES)
    target_modules: list[str] | None = _opt(None, "Layers that get a LoRA. Empty: to_q, to_k, to_v, to_out.0 "
                                            "for SD/SDXL; the lora_targets preset for FLUX/Chroma; q_proj, v_proj "
                                            "for LLMs.", group="advanced")
    train_text_encoder: bool = _opt(False, "Also train a LoRA on the text encoder(s).")
    text_encoder_lr: float | None = _opt(None, "Learning rate for the text encoder LoRA. Empty: learning_rate.",
                                         min=0.0, max=1.0, group="advanced")
    init_lora: str | None = _opt(None, "Continue training from an existing LoRA file (kohya, diffusers or "
                                 "PEFT folder).", kind="file")

    # --- schedule ------------------------------------------------------------------------------------
    resolution: int | None = _opt(None, "Training resolution in pixels. Empty: 512 for SD1.5, 768 for SD2, "
                                  "1024 for SDXL and FLUX.", min=64, max=4096)
    batch_size: int = _opt(1, "Images per step.", min=1, max=1024)
    epochs: int = _opt(10, "Passes over the dataset.", min=1, max=100000)
    max_train_steps: int | None = _opt(None, "Stop after this many optimizer steps (overrides epochs).",
                                       min=1, max=10_000_000)
    gradient_accumulation_steps: int = _opt(1, "Steps whose gradients are summed before one update.",
                                            min=1, max=1024, group="advanced")
    learning_rate: float = _opt(1e-4, "Learning rate of the LoRA weights.", min=0.0, max=1.0)
    lr_scheduler: str = _opt("cosine", "How the learning rate changes over the run.", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = _opt(0, "Steps of linear warm-up at the start.", min=0, max=10_000_000,
                                group="advanced")
    optimizer: str = _opt("adamw", "adamw; adamw8bit (bitsandbytes, less memory on CUDA); prodigy (finds its own "
                          "step size: learning_rate 1.0); adamw_schedulefree (no schedule needed, lr_scheduler is "
                          "ignored); adafactor (least memory).", choices=OPTIMIZERS)
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm (0 turns clipping off).", min=0.0,
                                group="advanced")
    seed: int = _opt(42, "Random seed; the same seed gives the same run.", min=0, max=2**32 - 1)
    ema_decay: float | None = _opt(None, "Keep an exponential moving average of the LoRA weights (e.g. 0.999) and "
                                   "export it: smoother, often better results. Empty or 0: off.", min=0.0,
                                   max=0.99999, group="advanced")
    ema_save_raw: bool = _opt(False, "With ema_decay: also write the raw (not averaged) weights as "
                              "<output_name>-raw.", group="advanced")

    # --- captions and loss ---------------------------------------------------------------------------
    caption_dropout_rate: float = _opt(0.0, "Share of steps on which an image trains with an empty caption "
                                       "(0.05-0.1 makes the LoRA work without its trigger too).", min=0.0, max=1.0,
                                       group="advanced")
    shuffle_tags: bool = _opt(False, "Shuffle the comma-separated tags of each caption at every step (tag "
                              "captions); the first keep_tokens tags stay in place.", group="advanced")
    keep_tokens: int = _opt(0, "With shuffle_tags or tag_dropout_rate: how many leading tags stay fixed (1 keeps "
                            "the trigger word first).", min=0, max=1000, group="advanced")
    tag_dropout_rate: float = _opt(0.0, "Drop each tag (after the first keep_tokens) with this probability at "
                                   "every step.", min=0.0, max=1.0, group="advanced")
    masked_loss: bool = _opt(False, "Weight the loss per pixel by a mask: the image's alpha channel, or a grayscale "
                             "image of the same name in a masks/ folder (white trains, black is ignored).",
                             group="advanced")

    # --- validation ----------------------------------------------------------------------------------
    validation_split: float = _opt(0.0, "Share of the images (LLM: rows) held out to measure a validation loss "
                                   "(e.g. 0.1). 0: no validation unless validation_dir is set.", min=0.0, max=0.5)
    validation_dir: str | None = _opt(None, "Folder of validation images with captions (LLM: a data file or folder) "
                                      "instead of validation_split.", kind="data")
    validation_every_steps: int = _opt(0, "Measure the validation loss every N steps (also at each checkpoint and "
                                       "at the end). 0: at checkpoints and at the end only.", min=0, max=10_000_000,
                                       group="advanced")

    # --- memory and speed ----------------------------------------------------------------------------
    mixed_precision: str = _opt("fp16", "no, fp16 or bf16. On a CPU the run uses full precision.",
                                choices=MIXED_PRECISIONS)
    gradient_checkpointing: bool = _opt(False, "Trade speed for memory: recompute activations.")
    cache_latents: str = _opt("memory", "Cache VAE latents once: memory, disk (big sets) or none.",
                              choices=CACHE_MODES, group="advanced")
    enable_bucket: bool = _opt(True, "Aspect-ratio buckets (no cropping of wide or tall images).",
                               group="advanced")
    auto_fit: bool = _opt(False, "On out-of-memory, retry with smaller settings instead of stopping.",
                          group="advanced")

    # --- diffusion details ---------------------------------------------------------------------------
    noise_offset: float = _opt(0.0, "Noise offset (0.05-0.1 helps very dark/bright images).", min=0.0, max=1.0,
                               group="advanced")
    min_snr_gamma: float | None = _opt(None, "Min-SNR loss weighting gamma (5 is common). Empty: off.",
                                       min=0.0, max=100.0, group="advanced")
    prediction_type: str = _opt("auto", "epsilon or v_prediction; 'auto' reads it from the model's scheduler.",
                                choices=PREDICTION_TYPES, group="advanced")

    # --- FLUX and other flow-matching models ---------------------------------------------------------
    timestep_sampling: str = _opt("sigmoid", "Which noise levels training sees: sigmoid (default), logit_normal "
                                  "(logit_mean/logit_std), uniform, shift (discrete_flow_shift), or flux_shift "
                                  "(by image size, as the FLUX pipeline shifts at inference).",
                                  choices=TIMESTEP_SAMPLINGS, group="flow")
    logit_mean: float = _opt(0.0, "logit_normal: mean of the normal drawn before the sigmoid.", min=-10.0, max=10.0,
                             group="flow")
    logit_std: float = _opt(1.0, "logit_normal: its standard deviation.", min=0.01, max=10.0, group="flow")
    discrete_flow_shift: float = _opt(3.0, "shift: how far noise levels move towards pure noise (1 = none, 3 as "
                                      "sd-scripts).", min=0.01, max=100.0, group="flow")
    loss_weighting: str = _opt("none", "Loss weight per noise level: none, sigma_sqrt or cosmap (SD3 paper).",
                               choices=LOSS_WEIGHTINGS, group="flow")
    max_sequence_length: int = _opt(512, "T5 prompt length in tokens (FLUX.1-dev and Chroma 512; schnell was "
                                    "trained with 256). Longer captions are cut.", min=16, max=512, group="flow")
    guidance_scale: float = _opt(1.0, "Guidance fed to a guidance-distilled model (FLUX.1-dev) while training; 1.0 "
                                 "as sd-scripts and ai-toolkit. Not the guidance used to render.", min=0.0, max=30.0,
                                 group="flow")
    base_quantization: str = _opt("none", "Frozen base transformer stored as: none (bf16), nf4 (4-bit, bitsandbytes, "
                                  "CUDA), int8 (torchao weight-only) or fp8 (float8, cast up when used).",
                                  choices=BASE_QUANTIZATIONS, group="flow")
    blocks_to_swap: int = _opt(0, "Keep the frozen weights of the transformer's last N blocks in CPU memory and move "
                                "each to the GPU only while it computes (sd-scripts' block swap): less GPU memory, "
                                "slower steps. Needs gradient_checkpointing and base_quantization none or fp8.",
                                min=0, max=1000, group="flow")
    lora_targets: str = _opt("attention", "Transformer layers with a LoRA: attention (q, k, v, out of image and "
                             "text) or all_linear (adds feed-forward and single-block MLP). target_modules overrides.",
                             choices=LORA_TARGET_PRESETS, group="flow")
    train_double_block_indices: str = _opt("all", "Double blocks that get a LoRA: all, none, or indices and ranges "
                                           "such as 0-7,10 (as sd-scripts).", group="flow")
    train_single_block_indices: str = _opt("all", "Single blocks that get a LoRA: all, none, or indices and ranges "
                                           "such as 0-19.", group="flow")

    # --- LLM details ---------------------------------------------------------------------------------
    max_seq_length: int = _opt(512, "LLM: longest training sequence in tokens (longer rows are truncated).",
                               min=8, max=1_000_000, group="llm")
    load_in_4bit: bool = _opt(False, "LLM: QLoRA, load the base model in 4-bit NF4 (CUDA + bitsandbytes).",
                              group="llm")
    save_merged_model: bool = _opt(False, "LLM: also write a merged full model folder (base + LoRA), for tools "
                                   "that take no adapters. Needs the model's size in RAM.", group="llm")

    # --- saving, logging, samples --------------------------------------------------------------------
    save_steps: int = _opt(500, "Save a checkpoint every N steps (0: only at the end).", min=0, max=10_000_000)
    keep_checkpoints: int = _opt(3, "How many checkpoints to keep (older ones are deleted).", min=1, max=10000)
    log_every_steps: int = _opt(1, "Write loss to TensorBoard and metrics.jsonl every N steps.", min=1,
                                group="advanced")
    sample_prompt: str | None = _opt(None, "Prompt rendered every sample_steps to watch progress.",
                                     group="advanced")
    sample_steps: int = _opt(0, "Render a sample image every N steps (0: off).", min=0, group="advanced")
    verify_export: bool = _opt(True, "Reload the exported LoRA and check it reproduces the trained model.",
                               group="advanced")

    # ------------------------------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Check every value's type and range. Raises ConfigError naming the field."""
        for f in fields(self):
            value = getattr(self, f.name)
            meta = f.metadata
            if value is None:
                if not _allows_none(f):
                    raise ConfigError(f.name, "must be set.")
                continue
            setattr(self, f.name, _coerce(f, value))
            value = getattr(self, f.name)
            if meta.get("choices") and value not in meta["choices"]:
                raise ConfigError(f.name, f"'{value}' is not allowed; choose one of: {', '.join(meta['choices'])}.")
            lo, hi = meta.get("min"), meta.get("max")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if (lo is not None and value < lo) or (hi is not None and value > hi):
                    raise ConfigError(f.name, f"{value} is out of range; allowed: {_range_text(lo, hi)}.")
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError("target_modules", "is an empty list; leave it out to use the defaults.")
        if self.validation_split and self.validation_dir:
            raise ConfigError("validation_dir", "and validation_split are both set; use one: a folder of validation "
                                                "images, or a share of the training images held out.")
        for key in ("train_double_block_indices", "train_single_block_indices"):
            block_indices(getattr(self, key), key)
        if self.blocks_to_swap:
            _check_block_swap(self)
        if not self.output_name or any(c in self.output_name for c in '/\\:*?"<>|'):
            raise ConfigError("output_name", "must be a plain file name without / \\ : * ? \" < > |.")
        return self

    def require_paths(self) -> None:
        """Checks needed only before training starts (the UI may hold an incomplete config)."""
        if not self.base_model:
            raise ConfigError("base_model", "is empty; give a model folder, a hub id or a .safetensors file.")
        if not self.train_data_dir:
            raise ConfigError("train_data_dir", "is empty; give the folder with your training images "
                                                "(for an LLM: the data file or folder).")

    # --- derived values ------------------------------------------------------------------------------
    @property
    def uses_ema(self) -> bool:
        return bool(self.ema_decay)

    @property
    def has_validation(self) -> bool:
        return bool(self.validation_split or self.validation_dir)

    @property
    def alpha(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank)

    def targets_for(self, family: str) -> list[str]:
        """``target_modules``, or the family's default layers when it is empty."""
        return list(self.target_modules or get_family(family).default_targets)

    def resolution_for(self, family: str) -> int:
        """``resolution``, or the family's default (512 when it has none)."""
        return int(self.resolution or get_family(family).default_resolution or 512)

    # --- conversion ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(Path(path), self.to_yaml())

    def replace(self, **changes: Any) -> "TrainConfig":
        return merge(self, changes)


def _check_block_swap(config: "TrainConfig") -> None:
    """``blocks_to_swap`` needs gradient checkpointing and a base whose weights are plain tensors."""
    if config.base_quantization in ("nf4", "int8"):
        raise ConfigError("blocks_to_swap", f"cannot swap {config.base_quantization} weights (they are packed with "
                          "their quantization state); use base_quantization fp8 (or none) with blocks_to_swap, or "
                          "set blocks_to_swap to 0.")
    if not config.gradient_checkpointing:
        raise ConfigError("blocks_to_swap", "needs gradient_checkpointing: true (without it the backward pass keeps "
                          "every block's weights on the GPU, so swapping saves nothing).")


def block_indices(text: str, key: str, count: int | None = None) -> list[int] | None:
    """``"all"`` -> None (every block), ``"none"`` -> [], ``"0-3,7"`` -> [0, 1, 2, 3, 7]; ConfigError naming ``key``
    for bad syntax or (with ``count``, the model's number of blocks) an index the model does not have."""
    text = (text or "").strip().lower()
    if text in ("", "all"):
        return None
    if text == "none":
        return []
    found: set[int] = set()
    for part in text.replace(" ", "").split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()) or (sep and int(hi) < int(lo)):
            raise ConfigError(key, f"'{part}' is not a block index or range; write all, none, or e.g. 0-7,10.")
        found.update(range(int(lo), (int(hi) if sep else int(lo)) + 1))
    if count is not None and max(found) >= count:
        raise ConfigError(key, f"block {max(found)} does not exist: this model has blocks 0 to {count - 1}.")
    return sorted(found)


FIELD_NAMES = tuple(f.name for f in fields(TrainConfig))
# Keys other trainers use for the same thing, accepted and renamed so existing configs work.
ALIASES = {
    "pretrained_model_name_or_path": "base_model",
    "network_dim": "lora_rank",
    "network_alpha": "lora_alpha",
    "rank": "lora_rank",
    "train_batch_size": "batch_size",
    "num_train_epochs": "epochs",
    "max_train_epochs": "epochs",
    "lr": "learning_rate",
    "lr_warmup": "lr_warmup_steps",
    "save_every_n_steps": "save_steps",
    "optimizer_type": "optimizer",
    "shuffle_caption": "shuffle_tags",
    "caption_tag_dropout_rate": "tag_dropout_rate",
}


def field_kind(f: dataclasses.Field) -> str:
    """model, data, file, output (paths), or bool, number, choice, list, text (from the type)."""
    if f.metadata.get("kind"):
        return f.metadata["kind"]
    t = _base_type(f)
    if f.metadata.get("choices"):
        return "choice"
    return {"bool": "bool", "int": "number", "float": "number", "list[str]": "list"}.get(t, "text")


def path_fields() -> list[dataclasses.Field]:
    """The fields that hold a path (or a model reference), by their kind."""
    return [f for f in fields(TrainConfig) if field_kind(f) in PATH_KINDS]


def _allows_none(f: dataclasses.Field) -> bool:
    return "None" in str(f.type)


def _base_type(f: dataclasses.Field) -> str:
    t = str(f.type).replace(" | None", "").replace("None | ", "")
    return t


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """Turn YAML/CLI values into the field's type, or raise ConfigError with the expected type."""
    t = _base_type(f)
    try:
        if t == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "on"):
                return True
            if isinstance(value, str) and value.strip().lower() in ("false", "no", "0", "off"):
                return False
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if t == "int":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) else int(value)
        if t == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if t == "str":
            if isinstance(value, (dict, list)):
                raise ValueError
            if _means_no(f, value):  # YAML reads a bare `no` as false
                return "no"
            return str(value)
        if t == "list[str]":
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                return list(value)
            raise ValueError
    except (TypeError, ValueError):
        pass
    else:
        return value
    kind = {"bool": "true or false", "int": "a whole number", "float": "a number", "str": "text",
            "list[str]": "a list of names"}.get(t, t)
    raise ConfigError(f.name, f"expected {kind}, got {value!r}.")


def _means_no(f: dataclasses.Field, value: Any) -> bool:
    """``mixed_precision: no`` arrives as False from YAML (and ``false`` is meant the same way)."""
    choices = f.metadata.get("choices") or ()
    if "no" not in choices:
        return False
    return value is False or (isinstance(value, str) and value.strip().lower() in ("false", "off", "none"))


def _range_text(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"{lo} to {hi}"
    if lo is not None:
        return f"at least {lo}"
    return f"at most {hi}"


def _normalize_keys(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key).strip()
        key = ALIASES.get(key, key)
        if key not in FIELD_NAMES:
            close = difflib.get_close_matches(key, FIELD_NAMES, n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else " See presets/lora_default.yaml for all keys."
            raise ConfigError(key, f"is not a known setting (in {source}).{hint}")
        out[key] = value
    return out


def merge(base: TrainConfig, changes: Mapping[str, Any], source: str = "overrides") -> TrainConfig:
    """A new validated config with ``changes`` applied on top of ``base``."""
    values = base.to_dict()
    values.update(_normalize_keys(changes, source))
    return TrainConfig(**values).validate()


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["batch_size=2", "learning_rate=5e-5"]`` -> dict, values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(item, "command-line overrides are written key=value, e.g. batch_size=2.")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return out


def load_config(path: str | os.PathLike | None = None, *, preset: str | None = None,
                overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Build a config: defaults <- preset <- YAML file <- overrides. Raises ConfigError."""
    cfg = TrainConfig()
    file_values = read_yaml_mapping(path) if path else {}
    preset_name = preset or file_values.pop("preset", None)
    if preset_name:
        cfg = merge(cfg, load_preset(preset_name), source=f"preset {preset_name}")
    if file_values:
        cfg = merge(cfg, file_values, source=str(path))
    if overrides:
        cfg = merge(cfg, overrides, source="command line")
    return cfg.validate()


GROUP_TITLES = {"main": "Main settings", "advanced": "Advanced",
                "flow": "Flow-matching transformers (FLUX, Chroma, Qwen-Image, Z-Image)",
                "llm": "Language models (family: llm)"}


def template_yaml() -> str:
    """A commented YAML file listing every key with its default and help (presets/lora_default.yaml)."""
    lines = ["# LoRA Studio training config: every key, its default and what it does.",
             "# Copy this file, change what you need, delete the rest, then run:",
             "#   python -m lora_studio train --config my_style.yaml [--preset 12gb] [key=value ...]",
             "# Order: preset, then this file, then key=value on the command line.", ""]
    for group, title in GROUP_TITLES.items():
        lines.append(f"# ---- {title} " + "-" * max(4, 90 - len(title)))
        for f in fields(TrainConfig):
            if f.metadata.get("group") != group:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            choices = f.metadata.get("choices")
            help_text = f.metadata["help"] + (f" ({' | '.join(choices)})" if choices else "")
            lines.append(f"# {help_text}")
            value = yaml.safe_dump({f.name: default}, default_flow_style=True).strip()[1:-1]
            lines.append(value)
        lines.append("")
    return "\n".join(lines)
