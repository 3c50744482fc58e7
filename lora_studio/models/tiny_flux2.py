"""A tiny random-weight FLUX.2 [klein]-shaped pipeline built offline: for the tests (and benchmarks).

It has the released klein models' structure: a ``Flux2KleinPipeline`` folder with a ``Qwen3ForCausalLM`` text
encoder (28 layers: the pipeline stacks hidden states 9, 18 and 27, so the transformer's text width is 3 x the
encoder's), a Qwen tokenizer with the ChatML template the pipeline applies (``enable_thinking=False``), an
``AutoencoderKLFlux2`` (32 latent channels, patchified 2x2 to 128 and normalised by its batch-norm statistics,
which are set to non-trivial values here so a trainer that skips them fails), a ``Flux2Transformer2DModel``
(double and single blocks, 4-axis RoPE, no guidance embedding) and the flow-matching scheduler with dynamic
shifting. ``distilled`` marks the pipeline as a step-distilled klein (4 steps, no CFG) instead of a base model.
The tokenizer is a byte-level BPE trained here with ``tokenizers`` (``models.tiny_vlms``); nothing touches the
network.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .tiny_vlms import _qwen_tokenizer

__all__ = ["build_tiny_flux2_klein"]

# Qwen3's ChatML with thinking switched off, as Flux2KleinPipeline renders a prompt
QWEN3_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
TEXT_WIDTH = 16


def _qwen3(vocab_size: int, pad: int, eos: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=32, num_hidden_layers=28,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
        pad_token_id=pad, eos_token_id=eos, bos_token_id=pad, tie_word_embeddings=True))


def _vae():
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(block_out_channels=(16, 16, 16, 16), layers_per_block=1, latent_channels=32,
                             norm_num_groups=8, sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
                             mid_block_add_attention=False)
    with torch.no_grad():  # statistics as a trained VAE has them: not zero mean, not unit variance
        vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape) * 0.5)
        vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape) * 2 + 0.5)
    return vae


def build_tiny_flux2_klein(folder: str | Path, seed: int = 0, *, distilled: bool = False) -> Path:
    """A tiny klein-shaped ``Flux2KleinPipeline`` folder (kept when it already holds one). Returns it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel

    folder = Path(folder)
    if (folder / "model_index.json").exists():
        return folder
    torch.manual_seed(seed)
    tokenizer = _qwen_tokenizer()
    tokenizer.chat_template = QWEN3_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")}
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * TEXT_WIDTH, timestep_guidance_channels=32, mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=_vae(), transformer=transformer, tokenizer=tokenizer,
                              text_encoder=_qwen3(len(tokenizer), ids["<|endoftext|>"], ids["<|im_end|>"]),
                              is_distilled=distilled)
    pipe.save_pretrained(folder)
    return folder
