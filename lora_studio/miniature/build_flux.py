"""Training the FLUX.1-shaped miniature from scratch on the CPU (``python -m lora_studio.miniature.build flux``).

A ``FluxPipeline`` folder, dev-like (a guidance input, FLUX's dynamic shift in the scheduler):

- **VAE**: the sd15 miniature's VAE made 16-channel and FLUX-shaped (no quant convs, a shift and a scaling
  factor), exactly: its 4 latent channels are embedded in 16 by a fixed orthonormal 16x4 matrix ``E`` (the
  encoder's last layer, its quant conv and post-quant conv folded into one layer that writes ``E u``, the
  decoder's first layer reading ``E^T z``), so it decodes what the sd15 VAE decodes. Its latents have rank 4 in
  16 channels (the transformer learns that the other 12 directions are empty). The shift factor is the mean of
  the world's latents and the scaling factor gives the four directions it uses unit spread.
- **Text**: a CLIP tokenizer and text encoder (32 wide, pooled embedding) as the sd15 miniature's, and a T5
  tokenizer (a Unigram vocabulary: the world's words are one token each, other words are spelt) and a 2-layer T5
  encoder (32 wide), both left at seeded random weights, frozen and stored in fp32.
- **Transformer**: a ``FluxTransformer2DModel`` (2 double and 2 single blocks, 4 heads of 16, patch 1 over the
  2x2-packed latents: 64 tokens at 64 px) trained with rectified flow (``noisy = (1 - s) x + s n``, target
  ``n - x``) with FLUX's resolution-shifted noise levels, on the world's pictures, with T5 prompts padded to 32
  tokens (its T5 tokenizer's ``model_max_length``: the studio renders and trains with that length; a plain
  ``FluxPipeline`` call needs ``max_sequence_length=32``, as its default 512 pads differently); random guidance
  values (the model learns to ignore them: it is not guidance-distilled); an EMA copy is saved.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import world
from .build_sd import MAX_TOKENS, Log, encode_world, new_text_encoder
from .flow import FlowRecipe, measure_and_save, noised, train_flow

LATENT_CHANNELS = 16
# T5 prompt length: the T5 tokenizer's model_max_length, which the studio renders and trains with (FLUX.1: 512;
# here 32, a sixteenth of the cost: the transformer attends over every padded text token).
T5_LENGTH = 32


@dataclass
class FluxRecipe(FlowRecipe):
    seed: int = 1400
    max_guidance: float = 8.0  # guidance values drawn from [0, max_guidance]: the model learns to ignore them


# --- the VAE ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def flux_vae_from(sd_vae, sample: torch.Tensor, seed: int):
    """The sd15 miniature's VAE as an exact FLUX-shaped 16-channel VAE (see the module's docstring)."""
    from diffusers import AutoencoderKL

    vae = embedded_vae(sd_vae, AutoencoderKL, LATENT_CHANNELS, seed)
    raw = vae.encode(sample).latent_dist.mean
    shift = float(raw.mean())
    spread = float((raw - shift).pow(2).sum(1).mean().div(sd_vae.config.latent_channels).sqrt())  # per used direction
    vae.register_to_config(shift_factor=round(shift, 4), scaling_factor=round(1.0 / spread, 4))
    return vae


@torch.no_grad()
def embedded_vae(sd_vae, cls, channels: int, seed: int, **config):
    """A ``cls`` VAE (no quant convs, ``channels`` latent channels, ``config`` added) that decodes exactly what the
    sd15 miniature's VAE decodes: its latents embedded by a fixed orthonormal ``channels`` x 4 matrix (seeded),
    folded into the encoder's last layer (with the quant convs) and the decoder's first. Eval mode, frozen."""
    cfg = sd_vae.config
    vae = cls(in_channels=3, out_channels=3, down_block_types=tuple(cfg.down_block_types),
              up_block_types=tuple(cfg.up_block_types), block_out_channels=tuple(cfg.block_out_channels),
              layers_per_block=cfg.layers_per_block, latent_channels=channels, norm_num_groups=cfg.norm_num_groups,
              sample_size=cfg.sample_size, use_quant_conv=False, use_post_quant_conv=False, **config)
    state = {k: v for k, v in sd_vae.state_dict().items() if not k.startswith(("quant_conv", "post_quant_conv"))}
    c = cfg.latent_channels
    gen = torch.Generator().manual_seed(seed)
    embed, _ = torch.linalg.qr(torch.randn(channels, c, generator=gen, dtype=torch.float64))
    embed = embed.float()
    q_w, q_b = sd_vae.quant_conv.weight[:c, :, 0, 0], sd_vae.quant_conv.bias[:c]   # the mean's rows
    p_w, p_b = sd_vae.post_quant_conv.weight[:, :, 0, 0], sd_vae.post_quant_conv.bias
    out_w, out_b = state["encoder.conv_out.weight"], state["encoder.conv_out.bias"]
    mean_w = torch.einsum("ij,jk,kchw->ichw", embed @ p_w, q_w, out_w)   # E P Q conv_out
    mean_b = embed @ (p_w @ (q_w @ out_b + q_b) + p_b)
    state["encoder.conv_out.weight"] = torch.cat([mean_w, torch.zeros_like(mean_w)])
    state["encoder.conv_out.bias"] = torch.cat([mean_b, torch.full_like(mean_b, -20.0)])  # log-variance: ~0
    state["decoder.conv_in.weight"] = torch.einsum("cjhw,ij->cihw", state["decoder.conv_in.weight"], embed)
    missing = vae.load_state_dict(state, strict=False).missing_keys
    if any(not k.startswith("bn.") for k in missing):  # FLUX.2's batch-norm statistics are set by the caller
        raise RuntimeError(f"the embedded VAE lacks {missing}")
    return vae.eval().requires_grad_(False)


# --- text ------------------------------------------------------------------------------------------------------
def text_parts(out: Path, seed: int):
    """Tokenizers (written into ``out``) and frozen text encoders: CLIP (pooled) and T5 (sequence)."""
    from .vocab import write_world_clip_tokenizer

    tokenizer = write_world_clip_tokenizer(out / "tokenizer", world.WORDS, MAX_TOKENS)
    clip = new_text_encoder(tokenizer, 32, seed=seed)
    return (tokenizer, clip) + t5_parts(out / "tokenizer_2", seed + 1)


def t5_parts(folder: Path, seed: int, width: int = 32):
    """A T5 tokenizer (written into ``folder``; the world's words one token each, ``T5_LENGTH`` tokens) and a
    2-layer T5 encoder ``width`` wide at seeded random weights, frozen."""
    from ..models.tiny_flux import _t5_encoder, write_t5_tokenizer

    tokenizer = write_t5_tokenizer(folder, max_length=T5_LENGTH, words=world.WORDS)
    torch.manual_seed(seed)
    return tokenizer, _t5_encoder(len(tokenizer), d_model=width).eval().requires_grad_(False)


@torch.no_grad()
def encode_prompts(pipe, captions: list[str]) -> dict[str, torch.Tensor]:
    """The pipeline's own prompt encoding (T5 padded to ``T5_LENGTH``, CLIP pooled) of each caption; the T5
    sequences in fp16 to save memory."""
    embeds, pooled = [], []
    for start in range(0, len(captions), 64):
        e, p, _ = pipe.encode_prompt(captions[start:start + 64], None, max_sequence_length=T5_LENGTH)
        embeds.append(e.half())
        pooled.append(p)
    return {"embeds": torch.cat(embeds), "pooled": torch.cat(pooled)}


# --- the transformer -------------------------------------------------------------------------------------------
def new_transformer():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=2, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))


def velocity(transformer, noisy: torch.Tensor, sigmas: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor,
             guidance: torch.Tensor) -> torch.Tensor:
    """The transformer's velocity for latents (B, C, h, w), packed and unpacked as ``FluxPipeline`` does."""
    from diffusers import FluxPipeline

    b, c, h, w = noisy.shape
    packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
    out = transformer(hidden_states=packed, timestep=sigmas, guidance=guidance, pooled_projections=pooled,
                      encoder_hidden_states=embeds, txt_ids=torch.zeros(embeds.shape[1], 3),
                      img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype),
                      return_dict=False)[0]
    return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)


def train_transformer(transformer, latents: torch.Tensor, rows: torch.Tensor, cond: dict[str, torch.Tensor],
                      scheduler_config, recipe: FluxRecipe, log: Log):
    """Rectified-flow training on cached latents with FLUX's resolution-shifted noise levels; returns the EMA copy."""
    from ..training.flow_matching import sample_sigmas, shift_mu

    mu = shift_mu((latents.shape[-2] // 2) * (latents.shape[-1] // 2), scheduler_config)

    def loss_for(model, x0, noise, sigmas, idx, gen):
        guidance = torch.rand(len(idx), generator=gen) * recipe.max_guidance
        pred = velocity(model, noised(x0, noise, sigmas), sigmas, cond["embeds"][rows[idx]].float(),
                        cond["pooled"][rows[idx]], guidance)
        return F.mse_loss(pred, noise - x0)

    return train_flow(transformer, latents, lambda gen, b: sample_sigmas("flux_shift", [gen] * b, mu=mu), loss_for,
                      recipe, log, "flux")


# --- the family --------------------------------------------------------------------------------------------------
def build_flux(out: Path, recipe: FluxRecipe, log: Log, base: Path) -> dict:
    """The FLUX.1-shaped miniature (the sd15 miniature in ``base`` gives the VAE). Returns what it measured."""
    from diffusers import FluxPipeline

    from ..models.tiny_flux import _flux_scheduler
    from .build_sd import _base_pipe, _caption_rows

    sd = _base_pipe(base)
    vae = flux_vae_from(sd.vae, torch.from_numpy(world.pixels(world.world_scenes(256, seed=recipe.seed + 2))),
                        recipe.seed)
    log(f"flux vae: shift {vae.config.shift_factor}, scaling {vae.config.scaling_factor}")
    tokenizer, clip, tokenizer_2, t5 = text_parts(out, recipe.seed)
    torch.manual_seed(recipe.seed + 5)
    pipe = FluxPipeline(scheduler=_flux_scheduler(dynamic=True), vae=vae, text_encoder=clip, tokenizer=tokenizer,
                        text_encoder_2=t5, tokenizer_2=tokenizer_2, transformer=new_transformer())
    latents, captions = encode_world(vae, recipe)
    unique, rows = _caption_rows(captions)
    cond = encode_prompts(pipe, unique)
    log(f"flux: {len(latents)} latents {tuple(latents.shape[1:])}, {len(unique)} captions encoded")
    pipe.transformer = train_transformer(pipe.transformer, latents, rows, cond, pipe.scheduler.config, recipe, log)
    return measure_and_save(pipe, out, recipe, 3.5, max_sequence_length=T5_LENGTH)
