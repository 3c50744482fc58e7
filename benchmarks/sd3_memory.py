"""SD3.5 memory on the meta device: the live peak of a real LoRA step of the full-size MMDiT (Large, Medium).

The coefficients of ``lora_studio.training.memory_flux``'s SD3.5 figures come from here, measured as for FLUX.1
(``flux_memory.py``): the transformer built on the meta device with the trainer's LoRA (rank 16, attention),
two steps (forward, backward, AdamW) with CUDA autocast's casting policy, flash attention's saved tensors and
diffusers' gradient checkpointing, at 512 and 1024 px; the slope between the two sizes is the cost of one token
of the joint sequence (image tokens ``(resolution / 16)^2`` plus 77 CLIP and 256 T5 tokens).

    python benchmarks/sd3_memory.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# diffusers' SD3Transformer2DModel configs of stabilityai/stable-diffusion-3.5-large and -medium
LARGE = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
             num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
             out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")
MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
              num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
              out_channels=16, pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))
TEXT_TOKENS = 77 + 256


def build(config: dict, rank: int = 16, targets: str = "attention", dtype: torch.dtype = torch.bfloat16):
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig

    from lora_studio.config import TrainConfig
    from lora_studio.families import SD3_ALL_LINEAR, SD3_ATTENTION
    from lora_studio.training.flux import target_modules

    with torch.device("meta"):
        model = SD3Transformer2DModel(**config)
    model.requires_grad_(False).to(dtype)
    layers = target_modules(model, TrainConfig(lora_targets=targets), (SD3_ATTENTION, SD3_ALL_LINEAR))
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=layers))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def step_peak(config: dict, resolution: int, checkpointing: bool, batch: int = 1) -> int:
    from bench_memory import live_peak_of_steps

    dtype, meta = torch.bfloat16, torch.device("meta")
    model = build(config)
    side = resolution // 8
    x = torch.empty(batch, 16, side, side, device=meta, dtype=dtype)
    inputs = dict(hidden_states=x, timestep=torch.empty(batch, device=meta, dtype=dtype),
                  encoder_hidden_states=torch.empty(batch, TEXT_TOKENS, 4096, device=meta, dtype=dtype),
                  pooled_projections=torch.empty(batch, 2048, device=meta, dtype=dtype), return_dict=False)
    return live_peak_of_steps(model, lambda: torch.nn.functional.mse_loss(model(**inputs)[0].float(), x.float()),
                              dtype, checkpointing)


def counts(config: dict) -> tuple[int, dict[str, int]]:
    """Transformer weights, and LoRA weights per rank for each lora_targets preset."""
    total = sum(p.numel() for p in build(config, rank=1).parameters() if not p.requires_grad)
    lora = {t: sum(p.numel() for p in build(config, rank=1, targets=t).parameters() if p.requires_grad)
            for t in ("attention", "all_linear")}
    return total, lora


if __name__ == "__main__":
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    for name, config in (("Large", LARGE), ("Medium", MEDIUM)):
        total, lora = counts(config)
        print(f"SD3.5 {name}: {total:,} transformer weights; LoRA per rank {lora}")
        for checkpointing in (True, False):
            peaks = {r: step_peak(config, r, checkpointing) for r in (512, 1024)}
            tokens = {r: (r // 16) ** 2 + TEXT_TOKENS for r in peaks}
            slope = (peaks[1024] - peaks[512]) / (tokens[1024] - tokens[512])
            print(f"  checkpointing {checkpointing}: step peak 512 px {peaks[512] / 1e9:.2f} GB, 1024 px "
                  f"{peaks[1024] / 1e9:.2f} GB; {slope:,.0f} bytes per token")
