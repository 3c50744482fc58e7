"""Training the Qwen-Image-shaped miniature from scratch on the CPU (``python -m lora_studio.miniature.build
qwen_image``).

A ``QwenImagePipeline`` folder shaped as the released Qwen-Image (it draws with true classifier-free guidance: a
negative prompt and ``true_cfg_scale``):

- **VAE**: an ``AutoencoderKLQwenImage`` (the causal 3-D VAE, 16 latent channels, 16-32-64 wide, one residual
  block per level, two downsamplings, the second one temporal as the released model's: 64 px pictures give 16x16
  latents, as the other miniatures') trained from scratch on the world's pictures and random colours, so it draws
  the concept's pink too. A picture is one frame, and on one frame each causal 3-D convolution sees only the last
  slice of its kernel in time (the earlier ones meet the causal zero padding): the build trains those slices
  through an exact 2-D convolution (``one_frame_convolutions``, three times faster) and zeroes the others, so the
  VAE is a 2-D one inflated into the 3-D shape. Its ``latents_mean`` / ``latents_std`` are the per-channel means
  and spreads of the world's latents (what the pipeline and the trainer normalise with).
  Measured: 3000 steps from scratch take about 3 minutes; starting from the sd15 miniature's VAE cannot be exact
  (its group norms are not the RMS norms of this one, and the decoder's upsamplers halve the channels here).
- **Text**: a Qwen2-shaped tokenizer (byte-level BPE; the words of the pipeline's prompt template and of the world
  one token each, so the system part the pipeline drops is exactly 34 tokens, as with the released tokenizer) and a
  2-layer ``Qwen2_5_VLForConditionalGeneration`` (32 wide) at seeded random weights, frozen and stored in fp32, its
  words' embeddings made orthogonal. The pipeline reads its last hidden state, only the real tokens.
- **Transformer**: a ``QwenImageTransformer2DModel`` (2 blocks, 4 heads of 16; 64 tokens at 64 px) trained with
  rectified flow through the trainer's own ``qwen_image_velocity`` (the model sees ``sigma``, target ``noise -
  latent``), noise levels from Qwen-Image's released scheduler (its dynamic shift at 64 tokens), 10 % blank
  prompts (the negative prompt the studio renders with) for the pipeline's true classifier-free guidance.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import torch
import torch.nn.functional as F

from . import world
from .build_sd import Log, encode_world, fit_vae, spread_word_embeddings
from .flow import FlowRecipe, captioned_loss, measure_and_save, train_flow

CFG = 2.0  # true_cfg_scale, with the blank negative prompt
TEXT_WIDTH = 32
VAE_CONFIG = dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True])


@dataclass
class QwenImageRecipe(FlowRecipe):
    step_fields: ClassVar[tuple[str, ...]] = ("steps", "vae_steps")

    seed: int = 1800
    vae_steps: int = 3000
    vae_batch: int = 16
    vae_lr: float = 1e-3
    empty_caption: float = 0.1


# --- the VAE ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def one_frame_convolutions():
    """While inside: a causal 3-D convolution of one frame with no cached frames is computed as the exact 2-D
    convolution with the last slice of its kernel in time (what the causal zero padding leaves of it)."""
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d

    original = QwenImageCausalConv3d.forward

    def forward(self, x, cache_x=None):
        if cache_x is not None or x.shape[2] != 1:
            return original(self, x, cache_x)
        padding = (self._padding[2], self._padding[0])  # (height, width)
        return F.conv2d(x[:, :, 0], self.weight[:, :, -1], self.bias, self.stride[1:], padding).unsqueeze(2)

    QwenImageCausalConv3d.forward = forward
    try:
        yield
    finally:
        QwenImageCausalConv3d.forward = original


class FrameVAE(torch.nn.Module):
    """``AutoencoderKLQwenImage`` read as a 2-D VAE of one-frame pictures (B, 3, H, W): ``encode(x).latent_dist``
    and ``decode(z).sample`` (not clamped, so that training gets gradients where a picture overshoots)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        moments = self.vae.quant_conv(self.vae.encoder(x.unsqueeze(2)))[:, :, 0]
        return SimpleNamespace(latent_dist=DiagonalGaussianDistribution(moments))

    def decode(self, z: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=self.vae.decoder(self.vae.post_quant_conv(z.unsqueeze(2)))[:, :, 0])


@torch.no_grad()
def train_qwen_vae(recipe: QwenImageRecipe, log: Log):
    """The VAE (see the module's docstring), in eval mode and frozen, with the world's latent statistics."""
    from diffusers import AutoencoderKLQwenImage
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d

    torch.manual_seed(recipe.seed + 1)
    vae = AutoencoderKLQwenImage(**VAE_CONFIG)
    with torch.enable_grad():
        fit_vae(FrameVAE(vae), recipe, log)
    for conv in vae.modules():
        if isinstance(conv, QwenImageCausalConv3d):
            conv.weight[:, :, :-1] = 0  # never read on one frame
    vae.eval().requires_grad_(False)
    sample = torch.from_numpy(world.pixels(world.world_scenes(256, seed=recipe.seed + 2)))
    latents = FrameVAE(vae).encode(sample).latent_dist.mean
    vae.register_to_config(latents_mean=[round(float(m), 4) for m in latents.mean((0, 2, 3))],
                           latents_std=[round(float(s), 4) for s in latents.std((0, 2, 3))])
    return vae


# --- text and transformer --------------------------------------------------------------------------------------
def text_parts(seed: int):
    """The Qwen-Image-shaped world tokenizer and the frozen 2-layer Qwen2.5-VL text encoder."""
    from ..models.tiny_qwen_image import _text_encoder, _tokenizer, check_template
    from .build_z_image import world_captions
    from .vocab import world_qwen3_tokenizer

    tokenizer, word_tokens = world_qwen3_tokenizer(world.WORDS, world_captions(), make=_tokenizer)
    check_template(tokenizer)
    torch.manual_seed(seed)
    encoder = _text_encoder(tokenizer, hidden=TEXT_WIDTH)
    spread_word_embeddings(encoder, word_tokens, seed)
    return tokenizer, encoder.eval().requires_grad_(False)


def new_transformer():
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                       attention_head_dim=16, num_attention_heads=4, joint_attention_dim=TEXT_WIDTH,
                                       axes_dims_rope=(4, 6, 6))


@torch.no_grad()
def encode_prompts(pipe, captions: list[str]) -> dict[str, torch.Tensor]:
    """The pipeline's own prompt encoding of each caption and, in the last row, of the blank negative prompt,
    zero-padded to the longest with the mask of real tokens."""
    from ..training.flow_matching import stack_padded
    from ..training.qwen_image import NEGATIVE

    embeds = []
    for caption in captions + [NEGATIVE]:
        e, _ = pipe.encode_prompt(prompt=[caption])
        embeds.append(e[0])
    mask = stack_padded([torch.ones(len(e), dtype=torch.long) for e in embeds])
    return {"embeds": stack_padded(embeds), "mask": mask}


def train_transformer(transformer, latents: torch.Tensor, rows: torch.Tensor, cond: dict[str, torch.Tensor],
                      scheduler_config, recipe: QwenImageRecipe, log: Log):
    """Qwen-Image's rectified flow on cached normalised latents; returns the EMA copy."""
    from ..training.flow_matching import sample_sigmas, shift_mu
    from ..training.qwen_image import qwen_image_velocity

    mu = shift_mu((latents.shape[-2] // 2) * (latents.shape[-1] // 2), scheduler_config)
    loss_for = captioned_loss(qwen_image_velocity, (cond["embeds"], cond["mask"]), rows, recipe.empty_caption)
    return train_flow(transformer, latents, lambda gen, b: sample_sigmas("flux_shift", [gen] * b, mu=mu), loss_for,
                      recipe, log, "qwen_image")


def build_qwen_image(out: Path, recipe: QwenImageRecipe, log: Log, base: Path) -> dict:
    """The Qwen-Image-shaped miniature (from scratch: ``base`` is not read). Returns what it measured."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    from ..models.tiny_qwen_image import QWEN_IMAGE_SCHEDULER
    from ..training.qwen_image import NEGATIVE, QwenLatents
    from .build_sd import _caption_rows, vae_colour_error

    with one_frame_convolutions():
        started = time.time()
        vae = train_qwen_vae(recipe, log)
        log(f"qwen_image vae: {time.time() - started:.0f}s, colour error {vae_colour_error(FrameVAE(vae))}")
        tokenizer, text_encoder = text_parts(recipe.seed)
        torch.manual_seed(recipe.seed + 5)
        pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER), vae=vae,
                                 text_encoder=text_encoder, tokenizer=tokenizer, transformer=new_transformer())
        latents, captions = encode_world(QwenLatents(vae), recipe)
        unique, rows = _caption_rows(captions)
        cond = encode_prompts(pipe, unique)
        log(f"qwen_image: {len(latents)} latents {tuple(latents.shape[1:])}, {len(unique)} captions encoded")
        pipe.transformer = train_transformer(pipe.transformer, latents, rows, cond, pipe.scheduler.config, recipe,
                                             log)
        return measure_and_save(pipe, out, recipe, None, vae=FrameVAE(vae), true_cfg_scale=CFG,
                                negative_prompt=NEGATIVE)
