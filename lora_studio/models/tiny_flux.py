"""Tiny random-weight FLUX.1 and Chroma pipelines built offline: for the tests, ``--demo`` and benchmarks.

They have the released models' structure: a ``FluxPipeline`` folder with a CLIP text encoder (pooled
embedding), a T5 encoder (sequence), a 16-channel VAE with FLUX's own scaling and shift factors, a
``FluxTransformer2DModel`` with double and single blocks (``guidance_embeds`` as FLUX.1-dev, off as
schnell) and the flow-matching scheduler with FLUX's dynamic shifting; a ``ChromaPipeline`` folder with
T5 only. The T5 tokenizer is built from a small Unigram vocabulary (the ``tokenizers`` model behind
``T5TokenizerFast``), the CLIP tokenizer as for the SD models; nothing touches the network.

``save_flux_single_file`` writes a pipeline's transformer as one checkpoint in the original BFL layout
(``double_blocks.N.img_attn.qkv.weight`` ...), as FLUX.1 files are published, for the single-file tests.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .tiny import _clip_text_config, make_demo_images, write_clip_tokenizer

__all__ = ["build_tiny_flux", "build_tiny_chroma", "make_demo_images", "FLUX_VAE_FACTORS"]

# FLUX.1's VAE: 16 latent channels, these factors (kept in the tiny model so a trainer that skips them fails).
FLUX_VAE_FACTORS = {"scaling_factor": 0.3611, "shift_factor": 0.1159}
# The released FLUX.1-dev scheduler: resolution-dependent (dynamic) shift between these sequence lengths.
FLUX_SCHEDULER = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15,
                  "num_train_timesteps": 1000}
_WORDS = ("a an the on of in with and red green blue yellow purple orange circle square light background "
          "dark photo style cat dog").split()


def write_t5_tokenizer(folder: Path, max_length: int = 512, words=_WORDS):
    """A ``T5TokenizerFast`` with a small Unigram vocabulary (pad, eos, unk, ``words``, letters), saved to
    ``folder``: each of ``words`` is one token, any other word is spelt letter by letter."""
    from transformers import T5TokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -2.0) for w in words]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789,.-_"] + [("\u2581", -3.0)]
    tok = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=max_length)
    tok.save_pretrained(folder)
    return T5TokenizerFast.from_pretrained(folder)


def _t5_encoder(vocab_size: int, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=64, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
                                   feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1))


def _flux_vae(channels: tuple[int, ...] = (16, 16, 16, 16), layers: int = 1, factors: dict | None = None):
    """A 16-channel VAE with FLUX.1's scaling and shift factors (or ``factors``: SD3's are others)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=channels,
                         layers_per_block=layers, latent_channels=16, norm_num_groups=8, sample_size=64,
                         use_quant_conv=False, use_post_quant_conv=False, **(factors or FLUX_VAE_FACTORS))


def _flux_scheduler(dynamic: bool = True):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0 if dynamic else 1.0, use_dynamic_shifting=dynamic,
                                           **FLUX_SCHEDULER)


TRANSFORMER_SHAPE = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
                         num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))


def build_tiny_flux(folder: str | Path, seed: int = 0, guidance: bool = True, *, width: int = 32,
                    transformer: dict | None = None, vae_channels: tuple[int, ...] = (16, 16, 16, 16),
                    vae_layers: int = 1) -> Path:
    """A tiny FLUX.1-shaped ``FluxPipeline`` folder: dev-like with ``guidance`` (guidance embedding, dynamic
    shift), schnell-like without. Returns the folder (kept when it already holds a pipeline). The defaults are
    the smallest that exercise every code path; the benchmark passes larger ``width`` (text encoders),
    ``transformer`` (overrides of ``TRANSFORMER_SHAPE``) and VAE channels."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    if (folder / "model_index.json").exists():
        return folder
    torch.manual_seed(seed)
    write_clip_tokenizer(folder / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    tokenizer_2 = write_t5_tokenizer(folder / "tokenizer_2")
    shape = {**TRANSFORMER_SHAPE, "joint_attention_dim": width, **(transformer or {})}
    transformer = FluxTransformer2DModel(**shape, pooled_projection_dim=width, guidance_embeds=guidance)
    pipe = FluxPipeline(scheduler=_flux_scheduler(dynamic=guidance), vae=_flux_vae(vae_channels, vae_layers),
                        text_encoder=CLIPTextModel(_clip_text_config(len(tokenizer), hidden=width)),
                        tokenizer=tokenizer, text_encoder_2=_t5_encoder(len(tokenizer_2), d_model=width),
                        tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.save_pretrained(folder)
    return folder


def build_tiny_chroma(folder: str | Path, seed: int = 0) -> Path:
    """A tiny Chroma-shaped ``ChromaPipeline`` folder (T5 only, no guidance embedding). Returns the folder."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel

    folder = Path(folder)
    if (folder / "model_index.json").exists():
        return folder
    torch.manual_seed(seed)
    tokenizer = write_t5_tokenizer(folder / "tokenizer")
    transformer = ChromaTransformer2DModel(**TRANSFORMER_SHAPE, approximator_num_channels=16,
                                           approximator_hidden_dim=32, approximator_layers=1)
    pipe = ChromaPipeline(scheduler=_flux_scheduler(), vae=_flux_vae(), text_encoder=_t5_encoder(len(tokenizer)),
                          tokenizer=tokenizer, transformer=transformer)
    pipe.save_pretrained(folder)
    return folder


def save_flux_single_file(folder: str | Path, path: str | Path) -> Path:
    """The FLUX transformer of the pipeline in ``folder`` as one ``.safetensors`` in the original BFL layout."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from .flux_single_file import diffusers_to_bfl

    transformer = FluxTransformer2DModel.from_pretrained(Path(folder) / "transformer")
    state = diffusers_to_bfl(transformer.state_dict())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path
