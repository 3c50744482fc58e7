"""GPU memory before a run starts: an estimate of the peak, a fit check, and the auto_fit step-down.

    estimate_memory(config, "sdxl")                 -> 9.4 (GB, the peak the run will reach)
    estimate_breakdown(config, "sdxl")              -> MemoryEstimate (the parts, for a tooltip)
    check_fits(config, "sdxl", gpu_memory_gb=12.0)  -> a warning sentence, or None when it fits
    next_step_down(config, "sdxl")                  -> (smaller config, "batch_size 4 -> 2 ..."), or None

The peak of an image run is the larger of two phases:

- **training**: CUDA context + frozen weights in the weight dtype (the UNet; the SD1.x/SD2.x trainer also
  keeps its frozen text encoder on the GPU, the SDXL trainer moves its encoders off after caching) + the
  LoRA's fp32 weights, gradients and optimizer state (AdamW 8 bytes a weight, 8-bit AdamW 2) + the
  activations the backward pass needs (proportional to batch x pixels) + cuBLAS/cuDNN workspace;
- **latent caching**: SD1.x/SD2.x keep UNet, text encoder and VAE on the GPU while the VAE encodes four
  images at a time in the weight dtype; SDXL has only the VAE there (one image at a time, fp32), then
  only the text encoders while the captions are encoded.

Where the constants come from: the activation bytes per megapixel are what ``benchmarks/bench_memory.py
--count`` measures on the meta device: every tensor the autograd graph saves for backward in a LoRA step
of the full-size UNet, with CUDA autocast's casts and flash attention modelled, with and without gradient
checkpointing (rerun it after a diffusers or torch upgrade). The parameter counts are those of the
released models. ``VAE_ENCODE_GB_PER_MP`` is the VAE encoder's live peak measured by ``bench_memory.py
--peak`` on the meta device (the same at 512 and 1024 px in fp32). ``ALLOCATOR_OVERHEAD``, ``WORKSPACE_GB``
and ``CONTEXT_GB`` are NOT YET MEASURED on a GPU: they are set from published reports (kohya-ss sd-scripts: an SDXL LoRA
with UNet only, gradient checkpointing, cached text encoder outputs and batch 1 trains in 8 GB, 10 GB
recommended; diffusers PR #4470: SDXL LoRA with gradient checkpointing and 8-bit Adam under 16 GB, text
encoders trained). Compare with ``bench_memory.py`` on a GPU and adjust. The LLM step's coefficients are
measured the same way on an 8B-shaped Llama (see ``_estimate_llm``); its 4-bit weight size is computed.

Checked by measurement without a GPU: ``bench_memory.py --peak`` runs a real LoRA step of every image preset
on the full-size UNets on the meta device and tracks the live tensors; the training phase estimated here
(without context and workspace) is 2-12% above that live peak (``docs/benchmarks.md``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import NamedTuple
from pathlib import Path

from ..config import TrainConfig
from ..families import get_family
from .memory_flux import FLOW_FIGURES, estimate_flow, figures_for

GB = 1e9
CONTEXT_GB = 0.5            # CUDA context + cuBLAS/cuDNN handles (outside max_memory_allocated); not yet measured
WORKSPACE_GB = 0.3          # cuBLAS/cuDNN workspaces and temporary buffers of the step; not yet measured
ALLOCATOR_OVERHEAD = 0.15   # caching-allocator fragmentation and activation gradients in backward; not yet measured
VAE_ENCODE_GB_PER_MP = 2.56  # peak VAE encoder activations per megapixel in fp32 (half in fp16); bench_memory --peak
FIT_MARGIN = 0.95           # warn when the estimate is above this share of the card's memory


@dataclass(frozen=True)
class FamilyFigures:
    """Sizes of one model family (parameter counts of the released models) and its activation cost."""

    unet_params: int
    text_encoders: tuple[tuple[int, int, int], ...]  # (parameters, layers, hidden size) per encoder
    keeps_text_encoders: bool                        # frozen encoders stay on the GPU during training
    lora_params_per_rank: int                        # UNet LoRA on to_q, to_k, to_v, to_out.0, per unit of rank
    act_mb_per_mp: dict[str, float]                  # "half"/"fp32" x ""/"_ckpt" -> MB per megapixel per image
    vae_batch: int                                   # images the VAE encodes at once while caching
    caches_alone: bool = False                       # only the VAE (then only the encoders) on the GPU while caching
    vae_params: int = 83_653_863
    tokens: int = 77


# Activation figures: ``bench_memory.py --count`` (diffusers 0.42, torch 2.13, rank 16 on the default
# targets; since 2026-12-02 with every unit input held, so no storage id is reused and the count repeats),
# per megapixel of one image. SD2 fp32 is scaled from SD2 half by SD1.5's fp32/half ratio.
FIGURES: dict[str, FamilyFigures] = {
    "sd15": FamilyFigures(
        unet_params=859_520_964, text_encoders=((123_060_480, 12, 768),), keeps_text_encoders=True,
        lora_params_per_rank=199_296, vae_batch=4,
        act_mb_per_mp={"half": 4497, "half_ckpt": 977, "fp32": 6156, "fp32_ckpt": 1588}),
    "sd2": FamilyFigures(
        unet_params=865_910_724, text_encoders=((340_387_840, 23, 1024),), keeps_text_encoders=True,
        lora_params_per_rank=207_488, vae_batch=4,
        act_mb_per_mp={"half": 4303, "half_ckpt": 809, "fp32": 5890, "fp32_ckpt": 1315}),
    "sdxl": FamilyFigures(
        unet_params=2_567_463_684, text_encoders=((123_060_480, 12, 768), (694_659_840, 32, 1280)),
        keeps_text_encoders=False, lora_params_per_rank=1_451_520, vae_batch=1, caches_alone=True,
        act_mb_per_mp={"half": 7621, "half_ckpt": 730, "fp32": 10732, "fp32_ckpt": 1153}),
}
RESOLUTION_STEP = 128


@dataclass
class MemoryEstimate:
    """The estimated peak (GB) and its parts; ``str()`` is one line for a log or a tooltip."""

    family: str
    parts: dict[str, float] = field(default_factory=dict)   # the training phase
    caching_gb: float = 0.0                                 # the latent-caching phase (images only)

    @property
    def training_gb(self) -> float:
        """The training phase alone (what ``bench_memory.py`` measures)."""
        return round(sum(self.parts.values()), 2)

    @property
    def total_gb(self) -> float:
        return round(max(self.training_gb, self.caching_gb), 2)

    def __float__(self) -> float:
        return self.total_gb

    def __str__(self) -> str:
        parts = ", ".join(f"{name} {gb:.1f}" for name, gb in self.parts.items() if gb >= 0.05)
        cache = f"; caching latents {self.caching_gb:.1f}" if self.caching_gb else ""
        return f"about {self.total_gb:.1f} GB ({parts}{cache})"


def _weight_bytes(config: TrainConfig) -> int:
    return 4 if config.mixed_precision == "no" else 2


def _optimizer_bytes(config: TrainConfig) -> int:
    """Per trainable weight: fp32 weight + fp32 gradient + optimizer state + the half copy autocast makes."""
    from .optimizers import state_bytes

    state = state_bytes(config)
    return 4 + 4 + state + (0 if config.mixed_precision == "no" else 2)


def _rank_scale(config: TrainConfig) -> float:
    """More target modules than the default four cost proportionally more LoRA weights (a rough guess)."""
    return max(len(config.targets_for("sd15")), 1) / 4


def estimate_breakdown(config: TrainConfig, family: str) -> MemoryEstimate:
    """The parts of the peak GPU memory of a run with ``config`` on a ``family`` model (see the module doc)."""
    if family == "llm":
        return _estimate_llm(config)
    if family in FLOW_FIGURES:  # transformer families (FLUX.1, Chroma): memory_flux.py
        return estimate_flow(config, family, context_gb=CONTEXT_GB, workspace_gb=WORKSPACE_GB,
                             overhead=ALLOCATOR_OVERHEAD, optimizer_bytes=_optimizer_bytes(config),
                             vae_gb_per_mp=VAE_ENCODE_GB_PER_MP)
    fig = FIGURES.get(family, FIGURES["sd15"])
    wb = _weight_bytes(config)
    resolution = config.resolution_for(family)
    megapixels = resolution * resolution / 1e6
    key = ("half" if wb == 2 else "fp32") + ("_ckpt" if config.gradient_checkpointing else "")
    te_params = sum(p for p, _, _ in fig.text_encoders)
    lora = fig.lora_params_per_rank * config.lora_rank * _rank_scale(config)
    te_activations = 0.0
    if config.train_text_encoder:
        lora += sum(4 * 2 * hidden * layers for _, layers, hidden in fig.text_encoders) * config.lora_rank
        te_activations = sum(40 * layers * fig.tokens * hidden for _, layers, hidden in fig.text_encoders)
        te_activations *= config.batch_size * (0.25 if config.gradient_checkpointing else 1.0)
    activations = fig.act_mb_per_mp[key] * 1e6 * megapixels * config.batch_size
    parts = {
        "CUDA context": CONTEXT_GB,
        "UNet weights": fig.unet_params * wb / GB,
        "text encoder weights": te_params * wb / GB if (fig.keeps_text_encoders or config.train_text_encoder
                                                         or config.shuffle_tags or config.tag_dropout_rate) else 0.0,
        "LoRA weights, gradients and optimizer": lora * _optimizer_bytes(config) / GB,
        "activations": (activations + te_activations) * (1 + ALLOCATOR_OVERHEAD) / GB,
        "workspace": WORKSPACE_GB,
    }
    vae_dtype_bytes = 4 if family == "sdxl" or wb == 4 else 2
    encode = (fig.vae_params * vae_dtype_bytes / GB
              + VAE_ENCODE_GB_PER_MP * vae_dtype_bytes / 4 * megapixels * fig.vae_batch)
    if fig.caches_alone:  # the VAE alone, then the text encoders alone
        caching = CONTEXT_GB + max(encode, te_params * wb / GB + WORKSPACE_GB)
    else:
        caching = CONTEXT_GB + (fig.unet_params + te_params) * wb / GB + encode
    return MemoryEstimate(family, {k: round(v, 3) for k, v in parts.items()}, round(caching, 3))


def unet_parameters(base_model: str, part: str = "unet") -> int | None:
    """The parameter count of a local diffusers folder's UNet (or another ``part``: ``transformer``), from its
    safetensors headers (no weights read)."""
    from safetensors import safe_open

    files = sorted((Path(base_model).expanduser() / part).glob("*.safetensors")) if base_model else []
    if not files:
        return None
    total = 0
    try:
        for file in files:
            with safe_open(str(file), framework="pt") as fh:
                total += sum(math.prod(fh.get_slice(key).get_shape()) for key in fh.keys())
    except Exception:  # an unreadable file: no note
        return None
    return total


def size_note(config: TrainConfig, family: str) -> str | None:
    """A sentence when the model's UNet (FLUX.1/Chroma: transformer) is far from the released one's size the
    estimate assumes."""
    if family in FIGURES:
        part, released = "unet", FIGURES[family].unet_params
    elif family in FLOW_FIGURES:
        part, released = "transformer", figures_for(config, family).transformer_params
    else:
        return None
    have = unet_parameters(config.base_model, part)
    if not have or 0.5 <= have / released <= 1.5:
        return None
    name = "UNet" if part == "unet" else part
    return (f"This model's {name} has {have / 1e6:,.1f} M weights, the released {family} model's "
            f"{released / 1e6:,.0f} M: the estimate is for a full-size model.")


def estimate_memory(config: TrainConfig, family: str) -> float:
    """Estimated peak GPU memory of the run in GB (decimal, as the presets' budgets)."""
    return estimate_breakdown(config, family).total_gb


def check_fits(config: TrainConfig, family: str, gpu_memory_gb: float | None) -> str | None:
    """A warning naming what to change when the estimate is above the card's memory; None when it fits."""
    if not gpu_memory_gb:
        return None
    est = estimate_breakdown(config, family)
    if est.total_gb <= gpu_memory_gb * FIT_MARGIN:
        return None
    from ..presets import recommend_preset

    entry = get_family(family)
    preset = recommend_preset(gpu_memory_gb, entry.preset_group, entry.variant_of(config.base_model))
    hint = f"Pick the preset '{preset.name}' ({preset.description}), or " if preset else ""
    step = next_step_down(config, family)
    first = f"; auto_fit would first try: {step.change}" if step else ""
    return (f"This run may not fit in the GPU's {gpu_memory_gb:.1f} GB: the estimated peak is {est}. "
            f"{hint}lower batch_size, turn on gradient_checkpointing, use optimizer adamw8bit or lower the "
            f"resolution, or set auto_fit: true to step down on out-of-memory{first}. "
            "(The estimate is not yet calibrated on a GPU; it can be off by a GB or two.)")


# --- auto_fit: the step-down sequence -------------------------------------------------------------------
def _smaller_batch(batch: int) -> int:
    """The largest divisor of ``batch`` at most half of it, so the effective batch stays exactly the same."""
    return max(d for d in range(1, batch // 2 + 1) if batch % d == 0)


class StepDown(NamedTuple):
    """One auto_fit step: the smaller config, what changed (for the log), and whether the run's checkpoints
    still continue exactly (only gradient checkpointing keeps the batch, optimizer and resolution)."""
    config: TrainConfig
    change: str
    resumable: bool = False


def next_step_down(config: TrainConfig, family: str | None = None) -> StepDown | None:
    """The next smaller setting after an out-of-memory, or None when nothing is left to try.

    Order: batch size (halved or so, gradient accumulation raised to keep the effective batch), then
    gradient checkpointing on, then 8-bit AdamW, then the resolution (128 px at a time, down to half the
    family's default; FLUX/Chroma first put the base in nf4). LLMs: batch, checkpointing, 8-bit AdamW, 4-bit
    base (QLoRA), then max_seq_length.
    Pure: the config given is not changed.
    """
    family = family or (config.model_family if config.model_family != "auto" else "sd15")
    if config.batch_size > 1:
        new = _smaller_batch(config.batch_size)
        ga = config.gradient_accumulation_steps * config.batch_size // new
        return StepDown(config.replace(batch_size=new, gradient_accumulation_steps=ga),
                        f"batch_size {config.batch_size} -> {new} (gradient_accumulation_steps "
                        f"{config.gradient_accumulation_steps} -> {ga}, same effective batch)")
    if not config.gradient_checkpointing:
        return StepDown(config.replace(gradient_checkpointing=True), "gradient_checkpointing off -> on", resumable=True)
    if config.optimizer == "adamw":  # the others have their own learning-rate meaning (Prodigy: lr 1.0)
        return StepDown(config.replace(optimizer="adamw8bit"), f"optimizer {config.optimizer} -> adamw8bit")
    if family == "llm":
        if not config.load_in_4bit:
            return StepDown(config.replace(load_in_4bit=True), "load_in_4bit off -> on (QLoRA)")
        if config.max_seq_length > 128:
            new = max(config.max_seq_length // 2, 128)
            return StepDown(config.replace(max_seq_length=new), f"max_seq_length {config.max_seq_length} -> {new}")
        return None
    if family in FLOW_FIGURES and config.base_quantization != "nf4" and not config.blocks_to_swap:  # nf4 cannot swap
        return StepDown(config.replace(base_quantization="nf4"),
                        f"base_quantization {config.base_quantization} -> nf4 (4-bit transformer weights)")
    current = config.resolution_for(family)
    new = (current - RESOLUTION_STEP) // 64 * 64
    if new >= (get_family(family).default_resolution or 512) // 2:
        return StepDown(config.replace(resolution=new), f"resolution {current} -> {new}")
    return None


# --- language models -------------------------------------------------------------------------------------
_LLM_DIMS = {"q_proj": ("h", "h"), "k_proj": ("h", "kv"), "v_proj": ("h", "kv"), "o_proj": ("h", "h"),
             "gate_proj": ("h", "i"), "up_proj": ("h", "i"), "down_proj": ("i", "h")}


def _llm_shape(base_model: str) -> dict[str, int] | None:
    try:
        cfg = json.loads((Path(base_model).expanduser() / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg)
    h = int(cfg.get("hidden_size") or 0)
    if not h:
        return None
    heads = int(cfg.get("num_attention_heads") or 1)
    return {"h": h, "i": int(cfg.get("intermediate_size") or 4 * h), "layers": int(cfg.get("num_hidden_layers") or 1),
            "kv": h * int(cfg.get("num_key_value_heads") or heads) // heads,
            "vocab": int(cfg.get("vocab_size") or 32000),
            "tied": bool(cfg.get("tie_word_embeddings", False))}


# Measured with ``bench_memory.py --peak`` (a real LoRA step of an 8B-shaped Llama on the meta device, vocabulary
# 32,000 and 256,000 to separate the two): with gradient checkpointing a token costs 2.6 bytes per hidden unit
# per layer (the kept layer inputs and one layer recomputed); every trained position costs 13.7 bytes per
# vocabulary entry (bf16 logits, their fp32 copy, log-softmax and gradient). Without checkpointing a token costs
# 2 x (10h + 3i) bytes per layer (measured: 7% less). Answers are taken as half of the tokens.
LLM_CKPT_BYTES_PER_H = 2.6
LLM_LOGIT_BYTES = 13.7
LLM_TRAINED_SHARE = 0.5


def _estimate_llm(config: TrainConfig) -> MemoryEstimate:
    """Weights (4-bit NF4 about 0.56 bytes a weight), LoRA state, activations per token (measured coefficients)."""
    s = _llm_shape(config.base_model) or {"h": 4096, "i": 14336, "layers": 32, "kv": 1024, "vocab": 128256,
                                          "tied": False}
    h, i, layers, kv, vocab = s["h"], s["i"], s["layers"], s["kv"], s["vocab"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i
    embed = vocab * h * (1 if s["tied"] else 2)
    weight_bytes = 0.56 if config.load_in_4bit else _weight_bytes(config)
    dims = {"h": h, "kv": kv, "i": i}
    lora = sum(dims[a] + dims[b] for t in config.targets_for("llm") if t in _LLM_DIMS for a, b in [_LLM_DIMS[t]])
    lora *= config.lora_rank * layers
    tokens = config.batch_size * config.max_seq_length
    per_token = layers * (LLM_CKPT_BYTES_PER_H * h if config.gradient_checkpointing else 2 * (10 * h + 3 * i))
    logits = tokens * LLM_TRAINED_SHARE * vocab * LLM_LOGIT_BYTES
    parts = {
        "CUDA context": CONTEXT_GB,
        "model weights": (layers * per_layer * weight_bytes + embed * 2) / GB,
        "LoRA weights, gradients and optimizer": lora * _optimizer_bytes(config) / GB,
        "activations": (tokens * per_token + logits) * (1 + ALLOCATOR_OVERHEAD) / GB,
        "workspace": WORKSPACE_GB,
    }
    return MemoryEstimate("llm", {k: round(v, 3) for k, v in parts.items()})


def largest_fitting_batch(config: TrainConfig, family: str, budget_gb: float, limit: int = 64) -> int:
    """The largest batch size whose estimate stays within ``budget_gb`` (0 if even batch 1 does not)."""
    best = 0
    for batch in range(1, limit + 1):
        if estimate_memory(config.replace(batch_size=batch), family) <= budget_gb:
            best = batch
        else:
            break
    return best


__all__ = ["MemoryEstimate", "estimate_memory", "estimate_breakdown", "check_fits", "next_step_down", "StepDown",
           "largest_fitting_batch", "FIGURES"]
