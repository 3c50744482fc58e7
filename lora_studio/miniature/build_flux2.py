"""Training the FLUX.2-klein-shaped miniature from scratch on the CPU (``python -m lora_studio.miniature.build
flux2``).

A ``Flux2KleinPipeline`` folder shaped as the undistilled klein base (it draws with classifier-free guidance):

- **VAE**: an ``AutoencoderKLFlux2`` (32 latent channels) that decodes exactly what the sd15 miniature's VAE
  decodes: its 4 channels embedded in 32 by a fixed orthonormal matrix, as the FLUX miniature's are in 16
  (``build_flux.embedded_vae``); its batch-norm statistics (what the pipeline and the trainer normalise the
  2x2-patchified 128 channels with) are the means and variances of the world's latents.
- **Text**: the Qwen3-shaped world tokenizer (as Z-Image's miniature's; prompts of ``TEXT_LENGTH`` tokens, its
  ``model_max_length``, which the studio trains and renders with) and a ``Qwen3ForCausalLM`` of 28 layers, 32 wide
  (the pipeline stacks hidden states 9, 18 and 27: 96 wide), at seeded random weights, frozen and stored in fp32,
  its words' embeddings made orthogonal.
- **Transformer**: a ``Flux2Transformer2DModel`` (2 double and 2 single blocks, 4 heads of 16, no guidance
  embedding; 64 tokens at 64 px) trained with rectified flow through the trainer's own ``flux2_velocity`` (the
  model sees ``sigma``, target ``noise - latent``) on batch-norm-normalised latents, noise levels drawn as the
  trainer's default (``sigmoid``), 10 % empty prompts for the pipeline's classifier-free guidance.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import world
from .build_sd import Log, encode_world, spread_word_embeddings
from .flow import FlowRecipe, captioned_loss, measure_and_save, train_flow

CFG = 2.0
TEXT_LENGTH = 32
TEXT_WIDTH = 32


@dataclass
class Flux2Recipe(FlowRecipe):
    seed: int = 1700
    empty_caption: float = 0.1


@torch.no_grad()
def flux2_vae_from(sd_vae, sample: torch.Tensor, seed: int):
    """The sd15 miniature's VAE as an exact ``AutoencoderKLFlux2`` with the world's batch-norm statistics."""
    from diffusers import AutoencoderKLFlux2

    from ..training.flux2 import patchify
    from .build_flux import embedded_vae

    vae = embedded_vae(sd_vae, AutoencoderKLFlux2, 32, seed,
                       mid_block_add_attention=sd_vae.config.mid_block_add_attention)
    patches = patchify(vae.encode(sample).latent_dist.mean)
    vae.bn.running_mean.copy_(patches.mean((0, 2, 3)))
    vae.bn.running_var.copy_(patches.var((0, 2, 3)))
    return vae


def text_parts(seed: int):
    """The Qwen3-shaped tokenizer (``TEXT_LENGTH`` tokens) and the frozen 28-layer text encoder."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from ..models.tiny_flux2 import QWEN3_TEMPLATE
    from .build_z_image import world_captions
    from .vocab import world_qwen3_tokenizer

    tokenizer, word_tokens = world_qwen3_tokenizer(world.WORDS, world_captions())
    tokenizer.model_max_length = TEXT_LENGTH
    tokenizer.chat_template = QWEN3_TEMPLATE
    pad, eos = (tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>"))
    torch.manual_seed(seed)
    encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH, num_hidden_layers=28,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024, pad_token_id=pad,
        eos_token_id=eos, bos_token_id=pad, tie_word_embeddings=True))
    spread_word_embeddings(encoder, word_tokens, seed)
    return tokenizer, encoder.eval().requires_grad_(False)


def new_transformer():
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(patch_size=1, in_channels=128, num_layers=2, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=4, joint_attention_dim=3 * TEXT_WIDTH,
                                   timestep_guidance_channels=64, mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4),
                                   guidance_embeds=False)


@torch.no_grad()
def encode_prompts(pipe, captions: list[str]) -> torch.Tensor:
    """The pipeline's own prompt encoding of each caption and, in the last row, of the empty prompt."""
    out = []
    captions = captions + [""]
    for start in range(0, len(captions), 64):
        embeds, _ = pipe.encode_prompt(prompt=captions[start:start + 64], max_sequence_length=TEXT_LENGTH)
        out.append(embeds)
    return torch.cat(out)


def train_transformer(transformer, latents: torch.Tensor, rows: torch.Tensor, embeds: torch.Tensor,
                      recipe: Flux2Recipe, log: Log):
    """FLUX.2's rectified flow on cached normalised latents; returns the EMA copy."""
    from ..training.flow_matching import sample_sigmas
    from ..training.flux2 import flux2_velocity

    loss_for = captioned_loss(flux2_velocity, (embeds,), rows, recipe.empty_caption)
    return train_flow(transformer, latents, lambda gen, b: sample_sigmas("sigmoid", [gen] * b), loss_for, recipe,
                      log, "flux2")


def build_flux2(out: Path, recipe: Flux2Recipe, log: Log, base: Path) -> dict:
    """The FLUX.2-klein-shaped miniature (the sd15 miniature in ``base`` gives the VAE). Returns what it measured."""
    from diffusers import Flux2KleinPipeline

    from ..models.tiny_flux2 import _scheduler
    from ..training.flux2 import bn_normalize
    from .build_sd import _base_pipe, _caption_rows

    sd = _base_pipe(base)
    vae = flux2_vae_from(sd.vae, torch.from_numpy(world.pixels(world.world_scenes(256, seed=recipe.seed + 2))),
                         recipe.seed)
    tokenizer, text_encoder = text_parts(recipe.seed)
    torch.manual_seed(recipe.seed + 5)
    pipe = Flux2KleinPipeline(scheduler=_scheduler(), vae=vae, transformer=new_transformer(), tokenizer=tokenizer,
                              text_encoder=text_encoder, is_distilled=False)
    latents, captions = encode_world(vae, recipe, normalize=lambda mean: bn_normalize(mean, vae))
    unique, rows = _caption_rows(captions)
    embeds = encode_prompts(pipe, unique)
    log(f"flux2: {len(latents)} latents {tuple(latents.shape[1:])}, {len(unique)} captions encoded")
    pipe.transformer = train_transformer(pipe.transformer, latents, rows, embeds, recipe, log)
    return measure_and_save(pipe, out, recipe, CFG, max_sequence_length=TEXT_LENGTH)
