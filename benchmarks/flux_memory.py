"""FLUX.1 memory on the meta device: the live peak of a real LoRA step of the full-size 12B transformer.

Used by ``bench_memory.py --peak`` (and ``--flux`` for this part alone); the coefficients of
``lora_studio.training.memory``'s FLUX estimate come from here. The transformer is FLUX.1-dev's (19 double
blocks, 38 single blocks, width 3072, guidance embedding) built on the meta device with the trainer's LoRA;
two steps run (forward, backward, AdamW) with CUDA autocast's casting policy, flash attention's saved tensors
and diffusers' own gradient checkpointing, and every tensor is counted from its creation until it is freed.
Quantized bases are not run here (their kernels do not exist on the meta device): their weights are computed
(``training/quantize.py``) and the step is the bf16 step plus one dequantized layer.

    python benchmarks/flux_memory.py              # the table: tokens, step peak, bytes per token
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# FLUX.1-dev's transformer (diffusers' FluxTransformer2DModel config of black-forest-labs/FLUX.1-dev)
FLUX_CONFIG = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                   num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                   axes_dims_rope=(16, 56, 56))
POOLED = 768


def build_flux(config: dict | None = None, rank: int = 16, targets: str = "attention",
               dtype: torch.dtype = torch.bfloat16):
    """The transformer on the meta device with the trainer's LoRA (fp32) on ``targets``' layers."""
    from diffusers import FluxTransformer2DModel

    from lora_studio.config import TrainConfig
    from lora_studio.training.flux import target_modules

    with torch.device("meta"):
        model = FluxTransformer2DModel(**(config or FLUX_CONFIG))
    model.requires_grad_(False).to(dtype)
    return with_trainer_lora(model, target_modules(model, TrainConfig(lora_targets=targets)), rank)


def with_trainer_lora(model, layers: list[str], rank: int):
    """``model`` (frozen, half precision) with the trainer's LoRA on ``layers``, its weights in fp32."""
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=layers))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def flux_inputs(batch: int, resolution: int, text_tokens: int, dtype: torch.dtype, config: dict | None = None):
    """What the trainer passes: packed latents, sigma, T5 sequence, pooled CLIP, ids, guidance."""
    from diffusers import FluxPipeline

    config = config or FLUX_CONFIG
    side = resolution // 16
    meta = torch.device("meta")
    return dict(hidden_states=torch.empty(batch, side * side, config["in_channels"], device=meta, dtype=dtype),
                encoder_hidden_states=torch.empty(batch, text_tokens, config["joint_attention_dim"], device=meta,
                                                  dtype=dtype),
                pooled_projections=torch.empty(batch, config["pooled_projection_dim"], device=meta, dtype=dtype),
                timestep=torch.empty(batch, device=meta, dtype=dtype),
                img_ids=FluxPipeline._prepare_latent_image_ids(batch, side, side, meta, dtype),
                txt_ids=torch.zeros(text_tokens, 3, device=meta, dtype=dtype),
                guidance=torch.empty(batch, device=meta), return_dict=False)


def measure_flux_step_peak(resolution: int, batch: int, checkpointing: bool, text_tokens: int = 512,
                           rank: int = 16, targets: str = "attention", config: dict | None = None):
    """``StepPeak`` of two LoRA steps of the bf16 transformer (weights, and what the step adds at its peak)."""
    from bench_memory import StepPeak, live_peak_of_steps

    dtype = torch.bfloat16
    model = build_flux(config, rank, targets, dtype)
    inputs = flux_inputs(batch, resolution, text_tokens, dtype, config)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = live_peak_of_steps(model, lambda: torch.nn.functional.mse_loss(
        model(**inputs)[0].float(), inputs["hidden_states"].float()), dtype, checkpointing)
    return StepPeak("flux", resolution, batch, checkpointing, weights, peak)


def tokens(resolution: int, text_tokens: int = 512) -> int:
    return (resolution // 16) ** 2 + text_tokens


def report_flux_peaks(say: Callable[[str], None] = print) -> list[tuple[str, float, float]]:
    """Per FLUX preset: the measured step (meta device) against the estimate's same parts; then the
    activation bytes per token with and without checkpointing (the estimate's coefficients)."""
    from lora_studio.config import TrainConfig
    from lora_studio.presets import list_presets
    from lora_studio.training.memory import estimate_breakdown

    from lora_studio.training.memory_flux import ACT_BYTES_PER_TOKEN

    say("| FLUX.1 12B step (meta device) | resolution | batch | checkpointing | tokens | step peak GB |")
    say("|---|---:|---:|---|---:|---:|")
    peaks = {}
    for checkpointing in (True, False):
        for resolution in (512, 1024):
            peaks[resolution, checkpointing] = peak = measure_flux_step_peak(resolution, 1, checkpointing)
            say(f"| FLUX.1 12B | {resolution} | 1 | {checkpointing} | {tokens(resolution)} | "
                f"{peak.step_peak_bytes / 1e9:.2f} |")
    say("")
    for checkpointing, key in ((True, "ckpt"), (False, "full")):
        slope = ((peaks[1024, checkpointing].step_peak_bytes - peaks[512, checkpointing].step_peak_bytes)
                 / (tokens(1024) - tokens(512)))
        say(f"Activation bytes per token, checkpointing {checkpointing}: {slope:,.0f} measured "
            f"(memory_flux.ACT_BYTES_PER_TOKEN['{key}'] = {ACT_BYTES_PER_TOKEN[key]:,}).")
    say("")
    say("| FLUX preset | resolution | batch | checkpointing | base | weights GB | step peak GB (bf16 step) | "
        "estimate of the same GB | estimate / measured |")
    say("|---|---:|---:|---|---|---:|---:|---:|---:|")
    out = []
    for preset in list_presets("flux"):
        cfg = TrainConfig().replace(**preset.values)
        peak = measure_flux_step_peak(cfg.resolution, cfg.batch_size, cfg.gradient_checkpointing,
                                      cfg.max_sequence_length, cfg.lora_rank, cfg.lora_targets)
        parts = estimate_breakdown(cfg, "flux").parts
        step = parts["activations"] + parts["LoRA weights, gradients and optimizer"]
        adam8 = 6 * sum(p.numel() for p in build_flux(rank=cfg.lora_rank, targets=cfg.lora_targets).parameters()
                        if p.requires_grad) if cfg.optimizer == "adamw8bit" else 0
        measured = (peak.step_peak_bytes - adam8) / 1e9
        say(f"| {preset.name} | {cfg.resolution} | {cfg.batch_size} | {cfg.gradient_checkpointing} | "
            f"{cfg.base_quantization} | {parts['transformer weights']:.2f} | {measured:.2f} | {step:.2f} | "
            f"{step / measured:.2f} |")
        out.append((preset.name, measured, step))
    return out


if __name__ == "__main__":
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    report_flux_peaks()
