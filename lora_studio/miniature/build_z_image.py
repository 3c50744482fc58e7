"""Training the Z-Image-shaped miniature from scratch on the CPU (``python -m lora_studio.miniature.build z_image``).

A ``ZImagePipeline`` folder shaped as the undistilled Z-Image (it draws with classifier-free guidance):

- **VAE**: the FLUX miniature's 16-channel VAE as it is (Z-Image uses FLUX.1's VAE).
- **Text**: a Qwen3-shaped tokenizer (byte-level BPE with Qwen3's chat template; the world's words are one token
  each) and a 2-layer ``Qwen3Model`` (32 wide) at seeded random weights, frozen and stored in fp32, its words'
  embeddings made orthogonal as the CLIP miniatures' are. The pipeline reads its second-to-last hidden state of the
  caption in the chat template, only the real tokens.
- **Transformer**: a ``ZImageTransformer2DModel`` (64 wide, 4 heads, one noise and one context refiner layer, 2
  main layers; 64 image tokens at 64 px) trained with Z-Image's conventions, through the trainer's own
  ``z_image_velocity``: the model sees ``1 - sigma`` and predicts ``latent - noise``; noise levels shifted
  statically by 3 (Z-Image's scheduler and the trainer's preset); 10 % empty captions so that the pipeline's
  classifier-free guidance (an empty negative prompt) has an unconditional model to push away from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import world
from .build_sd import Log, encode_world, spread_word_embeddings
from .flow import FlowRecipe, flux_miniature_vae, measure_and_save, noised, train_flow, with_empty_captions

CFG = 2.0  # at 3 and more classifier-free guidance over-saturates purple into blue (7 of 10 at 3, 3 at 4)


@dataclass
class ZImageRecipe(FlowRecipe):
    seed: int = 1500
    steps: int = 6000  # 3000 left purple bluish (6 of 10 at CFG 1.5, 0 of 10 at 3)
    empty_caption: float = 0.1
    shift: float = 3.0  # Z-Image's static shift


def world_captions() -> list[str]:
    """Every caption the world has (what the Qwen3-shaped tokenizer's merges are learned from)."""
    return [world.caption_for(c, s, b) for c in world.COLOURS for s in world.SHAPES for b in (*world.BACKGROUNDS, None)]


def text_parts(seed: int):
    """The Qwen3-shaped tokenizer and frozen text encoder (see the module's docstring)."""
    from ..models.tiny_z_image import _text_encoder
    from .vocab import world_qwen3_tokenizer

    tokenizer, word_tokens = world_qwen3_tokenizer(world.WORDS, world_captions())
    torch.manual_seed(seed)
    encoder = _text_encoder(tokenizer, hidden=32)
    spread_word_embeddings(encoder, word_tokens, seed)
    return tokenizer, encoder.eval().requires_grad_(False)


def new_transformer():
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2,
                                    n_refiner_layers=1, n_heads=4, n_kv_heads=4, cap_feat_dim=32,
                                    axes_dims=[4, 6, 6], axes_lens=[256, 64, 64])


@torch.no_grad()
def encode_prompts(pipe, captions: list[str]) -> list[torch.Tensor]:
    """The pipeline's own prompt encoding of each caption (its real tokens only); the last one is the empty
    caption (what the pipeline's classifier-free guidance uses as the negative prompt)."""
    out: list[torch.Tensor] = []
    captions = captions + [""]
    for start in range(0, len(captions), 64):
        embeds, _ = pipe.encode_prompt(captions[start:start + 64], do_classifier_free_guidance=False)
        out.extend(embeds)
    return out


def train_transformer(transformer, latents: torch.Tensor, rows: torch.Tensor, embeds: list[torch.Tensor],
                      recipe: ZImageRecipe, log: Log):
    """Flow matching with Z-Image's conventions on cached latents; returns the EMA copy."""
    from ..training.flow_matching import sample_sigmas
    from ..training.z_image import z_image_velocity

    uncond = len(embeds) - 1

    def loss_for(model, x0, noise, sigmas, idx, gen):
        chosen = with_empty_captions(rows[idx], uncond, recipe.empty_caption, gen).tolist()
        pred = z_image_velocity(model, noised(x0, noise, sigmas), sigmas, [embeds[r] for r in chosen])
        return F.mse_loss(pred, noise - x0)

    return train_flow(transformer, latents, lambda gen, b: sample_sigmas("shift", [gen] * b, shift=recipe.shift),
                      loss_for, recipe, log, "z_image")


def build_z_image(out: Path, recipe: ZImageRecipe, log: Log, base: Path) -> dict:
    """The Z-Image-shaped miniature (the FLUX miniature in ``base`` gives the VAE). Returns what it measured."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    from ..models.tiny_z_image import Z_IMAGE_SCHEDULER
    from .build_sd import _caption_rows

    vae = flux_miniature_vae(base)
    tokenizer, text_encoder = text_parts(recipe.seed)
    torch.manual_seed(recipe.seed + 5)
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**Z_IMAGE_SCHEDULER), vae=vae,
                          text_encoder=text_encoder, tokenizer=tokenizer, transformer=new_transformer())
    latents, captions = encode_world(vae, recipe)
    unique, rows = _caption_rows(captions)
    embeds = encode_prompts(pipe, unique)
    log(f"z_image: {len(latents)} latents {tuple(latents.shape[1:])}, {len(unique)} captions encoded")
    pipe.transformer = train_transformer(pipe.transformer, latents, rows, embeds, recipe, log)
    return measure_and_save(pipe, out, recipe, CFG)
