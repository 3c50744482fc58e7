"""A tiny random-weight SD3.5-shaped pipeline built offline: for the tests (and benchmarks).

It has the released models' structure: a ``StableDiffusion3Pipeline`` folder with two CLIP text encoders with
projection (CLIP-L and CLIP-G: penultimate hidden states and pooled projections), a T5 encoder (the sequence the
CLIP states are padded to and joined with), a 16-channel VAE with SD3's own scaling and shift factors, an
``SD3Transformer2DModel`` (MMDiT, patch size 2, RMS q/k norms, one dual-attention block as SD3.5 Medium's
MMDiT-X has; ``medium=False`` leaves it out, as SD3.5 Large) and the flow-matching scheduler with SD3's static
shift 3. Tokenizers are built with the ``tokenizers`` library (``models.tiny`` / ``models.tiny_flux``); nothing
touches the network.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .tiny import _clip_text_config, write_clip_tokenizer
from .tiny_flux import _flux_vae, _t5_encoder, write_t5_tokenizer

__all__ = ["build_tiny_sd3", "SD3_VAE_FACTORS"]

# SD3 / SD3.5's VAE: 16 latent channels, these factors (kept so a trainer that skips them fails).
SD3_VAE_FACTORS = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
CLIP_WIDTH, T5_WIDTH = 32, 64  # the pipeline pads CLIP-L + CLIP-G (2 x 32) to T5's width


def build_tiny_sd3(folder: str | Path, seed: int = 0, *, medium: bool = True) -> Path:
    """A tiny SD3.5-shaped ``StableDiffusion3Pipeline`` folder (kept when it already holds one). Returns it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    if (folder / "model_index.json").exists():
        return folder
    torch.manual_seed(seed)
    for name in ("tokenizer", "tokenizer_2"):
        write_clip_tokenizer(folder / name)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
    tokenizer_3 = write_t5_tokenizer(folder / "tokenizer_3")
    encoders = [CLIPTextModelWithProjection(_clip_text_config(len(tokenizer), hidden=CLIP_WIDTH)) for _ in range(2)]
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=T5_WIDTH, caption_projection_dim=16, pooled_projection_dim=2 * CLIP_WIDTH,
        out_channels=16, pos_embed_max_size=32, dual_attention_layers=(0,) if medium else (), qk_norm="rms_norm")
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_flux_vae(factors=SD3_VAE_FACTORS),
        text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1], tokenizer_2=tokenizer_2,
        text_encoder_3=_t5_encoder(len(tokenizer_3), d_model=T5_WIDTH), tokenizer_3=tokenizer_3,
        transformer=transformer)
    pipe.save_pretrained(folder)
    return folder
