"""Training the SD3-shaped miniature from scratch on the CPU (``python -m lora_studio.miniature.build sd3``).

A ``StableDiffusion3Pipeline`` folder shaped as SD3.5 Medium:

- **VAE**: the FLUX miniature's 16-channel VAE as it is (its own shift and scaling factors, which the pipeline
  and the trainer read from its config, as they read SD3's 0.0609 and 1.5305).
- **Text**: CLIP-L and CLIP-G as two ``CLIPTextModelWithProjection`` (32 wide each: penultimate hidden states
  joined to 64, pooled projections joined to 64) on the world's CLIP tokenizer, and a T5 (64 wide, prompts of 32
  tokens: its tokenizer's ``model_max_length``, which the studio trains and renders with), all at seeded random
  weights, frozen and stored in fp32 (the CLIP ones with the world's words made orthogonal).
- **Transformer**: an ``SD3Transformer2DModel`` (MMDiT, 4 joint blocks 64 wide, RMS q/k norms, one dual-attention
  block as SD3.5 Medium's MMDiT-X; patch 2: 64 image tokens at 64 px) trained with SD3's flow matching through the
  trainer's own ``sd3_velocity`` (timesteps ``1000 sigma``, target ``noise - latent``), noise levels shifted
  statically by 3 (SD3's scheduler and the presets), 10 % empty prompts (the pipeline's classifier-free guidance
  encodes an empty negative prompt).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import world
from .build_flux import T5_LENGTH, t5_parts
from .build_sd import MAX_TOKENS, Log, encode_world, new_text_encoder
from .flow import FlowRecipe, captioned_loss, flux_miniature_vae, measure_and_save, train_flow

CFG = 2.0  # at 3 and more classifier-free guidance over-saturates purple into blue (6 of 10 at 3)
T5_WIDTH = 64


@dataclass
class SD3Recipe(FlowRecipe):
    seed: int = 1600
    empty_caption: float = 0.1
    shift: float = 3.0  # SD3's static shift


def text_parts(out: Path, seed: int) -> dict:
    """The pipeline's tokenizers (written into ``out``) and frozen text encoders, by component name."""
    from .vocab import write_world_clip_tokenizer

    parts = {}
    for i, suffix in enumerate(("", "_2")):
        parts["tokenizer" + suffix] = write_world_clip_tokenizer(out / f"tokenizer{suffix}", world.WORDS, MAX_TOKENS)
        parts["text_encoder" + suffix] = new_text_encoder(parts["tokenizer" + suffix], 32, projection=True,
                                                          seed=seed + i)
    parts["tokenizer_3"], parts["text_encoder_3"] = t5_parts(out / "tokenizer_3", seed + 2, width=T5_WIDTH)
    return parts


def new_transformer():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=world.SIZE // 4, patch_size=2, in_channels=16, num_layers=4,
                                 attention_head_dim=16, num_attention_heads=4, joint_attention_dim=T5_WIDTH,
                                 caption_projection_dim=64, pooled_projection_dim=64, out_channels=16,
                                 pos_embed_max_size=world.SIZE // 4, dual_attention_layers=(0,), qk_norm="rms_norm")


@torch.no_grad()
def encode_prompts(pipe, captions: list[str]) -> dict[str, torch.Tensor]:
    """The pipeline's own prompt encoding of each caption and, in the last row, of the empty prompt."""
    embeds, pooled = [], []
    captions = captions + [""]
    for start in range(0, len(captions), 64):
        e, _, p, _ = pipe.encode_prompt(captions[start:start + 64], None, None, do_classifier_free_guidance=False,
                                        max_sequence_length=T5_LENGTH)
        embeds.append(e)
        pooled.append(p)
    return {"embeds": torch.cat(embeds), "pooled": torch.cat(pooled)}


def train_transformer(transformer, latents: torch.Tensor, rows: torch.Tensor, cond: dict[str, torch.Tensor],
                      recipe: SD3Recipe, log: Log):
    """SD3's flow matching on cached latents; returns the EMA copy."""
    from ..training.flow_matching import sample_sigmas
    from ..training.sd3 import sd3_velocity

    loss_for = captioned_loss(sd3_velocity, (cond["embeds"], cond["pooled"]), rows, recipe.empty_caption)
    return train_flow(transformer, latents, lambda gen, b: sample_sigmas("shift", [gen] * b, shift=recipe.shift),
                      loss_for, recipe, log, "sd3")


def build_sd3(out: Path, recipe: SD3Recipe, log: Log, base: Path) -> dict:
    """The SD3-shaped miniature (the FLUX miniature in ``base`` gives the VAE). Returns what it measured."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from .build_sd import _caption_rows

    vae = flux_miniature_vae(base)
    parts = text_parts(out, recipe.seed)
    torch.manual_seed(recipe.seed + 5)
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=recipe.shift), vae=vae,
                                    transformer=new_transformer(), **parts)
    latents, captions = encode_world(vae, recipe)
    unique, rows = _caption_rows(captions)
    cond = encode_prompts(pipe, unique)
    log(f"sd3: {len(latents)} latents {tuple(latents.shape[1:])}, {len(unique)} captions encoded")
    pipe.transformer = train_transformer(pipe.transformer, latents, rows, cond, recipe, log)
    return measure_and_save(pipe, out, recipe, CFG, max_sequence_length=T5_LENGTH)
