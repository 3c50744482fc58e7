"""SD3.5 and FLUX.2 memory on the meta device: the live peak of a real LoRA step of the full-size transformers.

The coefficients of ``lora_studio.training.memory_flux``'s SD3.5 and FLUX.2 figures come from here, measured as
for FLUX.1 (``flux_memory.py``): the transformer built on the meta device with the trainer's LoRA (rank 16,
attention), two steps (forward, backward, AdamW) with CUDA autocast's casting policy, flash attention's saved
tensors and diffusers' gradient checkpointing, at 512 and 1024 px; the slope between the two sizes is the cost of
one token of the joint sequence (image tokens ``(resolution / 16)^2`` plus the text tokens: SD3.5 77 CLIP + 256
T5, FLUX.2 512).

    python benchmarks/flow_memory.py             # SD3.5 Large and Medium, FLUX.2 klein 4B, 9B and dev
    python benchmarks/flow_memory.py 4           # from the fifth model on (FLUX.2 dev alone)
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
# Flux2Transformer2DModel configs of FLUX.2 [klein] 4B and 9B (text width 3 x Qwen3-4B's 2560 / Qwen3-8B's 4096)
KLEIN_4B = dict(num_layers=5, num_single_layers=20, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=7680, guidance_embeds=False)
KLEIN_9B = dict(num_layers=8, num_single_layers=24, attention_head_dim=128, num_attention_heads=32,
                joint_attention_dim=12288, guidance_embeds=False)
# FLUX.2 [dev] (diffusers' defaults: 8 double and 48 single blocks of width 6144, Mistral Small 3.1's 3 x 5120)
DEV = dict(num_layers=8, num_single_layers=48, attention_head_dim=128, num_attention_heads=48,
           joint_attention_dim=15360, guidance_embeds=True)
TEXT_TOKENS = {"sd3": 77 + 256, "flux2": 512}


def build(family: str, config: dict, rank: int = 16, targets: str = "attention", dtype: torch.dtype = torch.bfloat16):
    """The transformer on the meta device with the trainer's LoRA (fp32) on ``targets``' layers."""
    from diffusers import Flux2Transformer2DModel, SD3Transformer2DModel
    from peft import LoraConfig

    from lora_studio.config import TrainConfig
    from lora_studio.families import FLUX2_ALL_LINEAR, FLUX2_ATTENTION, SD3_ALL_LINEAR, SD3_ATTENTION
    from lora_studio.training.flux import target_modules

    cls, presets = ((SD3Transformer2DModel, (SD3_ATTENTION, SD3_ALL_LINEAR)) if family == "sd3"
                    else (Flux2Transformer2DModel, (FLUX2_ATTENTION, FLUX2_ALL_LINEAR)))
    with torch.device("meta"):
        model = cls(**config)
    model.requires_grad_(False).to(dtype)
    blocks = {"transformer_blocks": "train_double_block_indices"} if family == "sd3" else None
    layers = target_modules(model, TrainConfig(lora_targets=targets), *presets, blocks)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=layers))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def _inputs(family: str, config: dict, batch: int, resolution: int, dtype: torch.dtype) -> dict:
    meta, text = torch.device("meta"), TEXT_TOKENS[family]
    if family == "sd3":
        side = resolution // 8
        return dict(hidden_states=torch.empty(batch, 16, side, side, device=meta, dtype=dtype),
                    timestep=torch.empty(batch, device=meta, dtype=dtype),
                    encoder_hidden_states=torch.empty(batch, text, 4096, device=meta, dtype=dtype),
                    pooled_projections=torch.empty(batch, 2048, device=meta, dtype=dtype), return_dict=False)
    side = resolution // 16
    ids = lambda n: torch.zeros(batch, n, 4, device=meta, dtype=torch.long)  # noqa: E731
    return dict(hidden_states=torch.empty(batch, side * side, 128, device=meta, dtype=dtype),
                encoder_hidden_states=torch.empty(batch, text, config["joint_attention_dim"], device=meta, dtype=dtype),
                timestep=torch.empty(batch, device=meta, dtype=dtype), img_ids=ids(side * side), txt_ids=ids(text),
                guidance=torch.empty(batch, device=meta, dtype=dtype) if config.get("guidance_embeds") else None,
                return_dict=False)


def step_peak(family: str, config: dict, resolution: int, checkpointing: bool, batch: int = 1) -> int:
    """The live peak (bytes) that two LoRA steps of the bf16 transformer add to its weights."""
    from bench_memory import live_peak_of_steps

    dtype = torch.bfloat16
    model = build(family, config)
    inputs = _inputs(family, config, batch, resolution, dtype)
    x = inputs["hidden_states"]
    return live_peak_of_steps(model, lambda: torch.nn.functional.mse_loss(model(**inputs)[0].float(), x.float()),
                              dtype, checkpointing)


def counts(family: str, config: dict) -> tuple[int, dict[str, int]]:
    """Transformer weights, and LoRA weights per rank for each lora_targets preset."""
    total = sum(p.numel() for p in build(family, config, rank=1).parameters() if not p.requires_grad)
    lora = {t: sum(p.numel() for p in build(family, config, rank=1, targets=t).parameters() if p.requires_grad)
            for t in ("attention", "all_linear")}
    return total, lora


if __name__ == "__main__":
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    models = (("sd3", "SD3.5 Large", LARGE), ("sd3", "SD3.5 Medium", MEDIUM), ("flux2", "FLUX.2 klein 4B", KLEIN_4B),
              ("flux2", "FLUX.2 klein 9B", KLEIN_9B), ("flux2", "FLUX.2 dev", DEV))
    for family, name, config in models[int(sys.argv[1]) if len(sys.argv) > 1 else 0:]:
        total, lora = counts(family, config)
        print(f"{name}: {total:,} transformer weights; LoRA per rank {lora}")
        for checkpointing in (True, False):
            peaks = {r: step_peak(family, config, r, checkpointing) for r in (512, 1024)}
            tokens = {r: (r // 16) ** 2 + TEXT_TOKENS[family] for r in peaks}
            slope = (peaks[1024] - peaks[512]) / (tokens[1024] - tokens[512])
            print(f"  checkpointing {checkpointing}: step peak 512 px {peaks[512] / 1e9:.2f} GB, 1024 px "
                  f"{peaks[1024] / 1e9:.2f} GB; {slope:,.0f} bytes per token")
