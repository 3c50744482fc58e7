"""Qwen-Image and Z-Image memory on the meta device: the live peak of a real LoRA step of the full-size 20B and
6B transformers.

The coefficients of ``lora_studio.training.memory_flux``'s Qwen-Image and Z-Image figures come from here, measured as
``flux_memory.py`` measures FLUX.1: the transformer of Qwen/Qwen-Image (60 dual-stream blocks, width 3072, text
width 3584) built on the meta device with the trainer's LoRA, two steps (forward, backward, AdamW) under CUDA
autocast's casting policy with flash attention's saved tensors, with and without diffusers' gradient
checkpointing; every tensor is counted from its creation until it is freed. Z-Image-Turbo's transformer (30 layers
of width 3840, 2 noise and 2 context refiners, Qwen3-4B features of width 2560) likewise. Quantized bases are
computed, not run.

    python benchmarks/qwen_z_memory.py          # the tables: tokens, step peak, bytes per token
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Tongyi-MAI/Z-Image-Turbo transformer/config.json (diffusers' defaults)
Z_IMAGE_CONFIG = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30,
                      n_refiner_layers=2, n_heads=30, n_kv_heads=30, cap_feat_dim=2560, axes_dims=[32, 48, 48],
                      axes_lens=[1536, 512, 512])
# Qwen/Qwen-Image transformer/config.json
QWEN_IMAGE_CONFIG = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                         num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))


def build_qwen_image(config: dict | None = None, rank: int = 16, targets: str = "attention",
                     dtype: torch.dtype = torch.bfloat16):
    """The transformer on the meta device (its rotary tables on the CPU, as they are built) with the trainer's
    LoRA (fp32) on ``targets``' layers."""
    from diffusers import QwenImageTransformer2DModel
    from flux_memory import with_trainer_lora

    from lora_studio.config import TrainConfig
    from lora_studio.families import QWEN_ALL_LINEAR, QWEN_ATTENTION
    from lora_studio.training.flux import target_modules
    from lora_studio.training.qwen_image import QWEN_BLOCKS

    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**(config or QWEN_IMAGE_CONFIG))
    model.requires_grad_(False).to(dtype)
    layers = target_modules(model, TrainConfig(lora_targets=targets), QWEN_ATTENTION, QWEN_ALL_LINEAR, QWEN_BLOCKS)
    return with_trainer_lora(model, layers, rank)


def qwen_inputs(batch: int, resolution: int, text_tokens: int, dtype: torch.dtype, config: dict | None = None):
    """What the trainer passes: packed latents, sigma, the Qwen2.5-VL sequence and its mask, the token grid."""
    config = config or QWEN_IMAGE_CONFIG
    side = resolution // 16
    meta = torch.device("meta")
    return dict(hidden_states=torch.empty(batch, side * side, config["in_channels"], device=meta, dtype=dtype),
                encoder_hidden_states=torch.empty(batch, text_tokens, config["joint_attention_dim"], device=meta,
                                                  dtype=dtype),
                encoder_hidden_states_mask=None, timestep=torch.empty(batch, device=meta, dtype=dtype),
                img_shapes=[(1, side, side)] * batch, return_dict=False)


def measure_qwen_step_peak(resolution: int, batch: int, checkpointing: bool, text_tokens: int = 128,
                           rank: int = 16, targets: str = "attention", config: dict | None = None):
    """``StepPeak`` of two LoRA steps of the bf16 transformer (weights, and what the step adds at its peak)."""
    from bench_memory import StepPeak, live_peak_of_steps

    dtype = torch.bfloat16
    model = build_qwen_image(config, rank, targets, dtype)
    inputs = qwen_inputs(batch, resolution, text_tokens, dtype, config)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = live_peak_of_steps(model, lambda: torch.nn.functional.mse_loss(
        model(**inputs)[0].float(), inputs["hidden_states"].float()), dtype, checkpointing)
    return StepPeak("qwen_image", resolution, batch, checkpointing, weights, peak)


def build_z_image(rank: int = 16, targets: str = "attention", dtype: torch.dtype = torch.bfloat16):
    """Z-Image-Turbo's transformer on the meta device with the trainer's LoRA (fp32)."""
    from diffusers import ZImageTransformer2DModel
    from flux_memory import with_trainer_lora

    from lora_studio.config import TrainConfig
    from lora_studio.families import Z_IMAGE_ALL_LINEAR, Z_IMAGE_ATTENTION
    from lora_studio.training.flux import target_modules
    from lora_studio.training.z_image import Z_IMAGE_BLOCKS

    with torch.device("meta"):
        model = ZImageTransformer2DModel(**Z_IMAGE_CONFIG)
    model.requires_grad_(False).to(dtype)
    layers = target_modules(model, TrainConfig(lora_targets=targets), Z_IMAGE_ATTENTION, Z_IMAGE_ALL_LINEAR,
                            Z_IMAGE_BLOCKS)
    return with_trainer_lora(model, layers, rank)


def measure_z_step_peak(resolution: int, batch: int, checkpointing: bool, text_tokens: int = 128, rank: int = 16,
                        targets: str = "attention"):
    """``StepPeak`` of two LoRA steps of Z-Image's bf16 transformer (latents as one frame each, as the trainer)."""
    from bench_memory import StepPeak, live_peak_of_steps

    dtype, meta = torch.bfloat16, torch.device("meta")
    model = build_z_image(rank, targets, dtype)
    side = resolution // 8
    latents = [torch.empty(16, 1, side, side, device=meta, dtype=dtype) for _ in range(batch)]
    caps = [torch.empty(text_tokens, Z_IMAGE_CONFIG["cap_feat_dim"], device=meta, dtype=dtype) for _ in range(batch)]
    t = torch.empty(batch, device=meta, dtype=dtype)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = live_peak_of_steps(model, lambda: torch.nn.functional.mse_loss(
        torch.stack(model(latents, t, caps, return_dict=False)[0]).float(), torch.stack(latents).float()),
        dtype, checkpointing)
    return StepPeak("z_image", resolution, batch, checkpointing, weights, peak)


def tokens(resolution: int, text_tokens: int = 128) -> int:
    return (resolution // 16) ** 2 + text_tokens


def report_peaks(family: str, say: Callable[[str], None] = print) -> dict[tuple[int, bool], float]:
    """The measured steps of ``family`` (qwen_image, z_image) and the activation bytes per token (the estimate's
    coefficients)."""
    from lora_studio.training.memory_flux import FLOW_FIGURES

    measure = measure_qwen_step_peak if family == "qwen_image" else measure_z_step_peak
    say(f"| {family} step (meta device) | resolution | batch | checkpointing | tokens | step peak GB |")
    say("|---|---:|---:|---|---:|---:|")
    peaks = {}
    for checkpointing in (True, False):
        for resolution in (512, 1024):
            peak = measure(resolution, 1, checkpointing)
            peaks[resolution, checkpointing] = peak.step_peak_bytes
            say(f"| {family} | {resolution} | 1 | {checkpointing} | {tokens(resolution)} | "
                f"{peak.step_peak_bytes / 1e9:.2f} |")
    for checkpointing, key in ((True, "ckpt"), (False, "full")):
        slope = (peaks[1024, checkpointing] - peaks[512, checkpointing]) / (tokens(1024) - tokens(512))
        say(f"Activation bytes per token, checkpointing {checkpointing}: {slope:,.0f} measured "
            f"(memory_flux.FLOW_FIGURES['{family}'].act_bytes['{key}'] = {FLOW_FIGURES[family].act_bytes[key]:,}).")
    return peaks


if __name__ == "__main__":
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    report_peaks("qwen_image")
    report_peaks("z_image")
