"""A tiny random-weight Z-Image pipeline built offline: for the tests.

It has the released Z-Image-Turbo's structure: a ``ZImagePipeline`` folder with a Qwen3 text encoder (the
pipeline reads its second-to-last hidden state) and a Qwen tokenizer with Qwen3's chat template (the pipeline
calls ``apply_chat_template(..., enable_thinking=True)``), FLUX's 16-channel VAE with its scaling and shift
factors, a ``ZImageTransformer2DModel`` (noise and context refiners, main layers; its ``x_pad_token`` and
``cap_pad_token`` set to random values, as a trained model's are) and the flow-matching scheduler with
Z-Image-Turbo's static shift 3. Nothing touches the network.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .tiny_flux import _flux_vae
from .tiny_vlms import QWEN_SPECIALS, _bpe, _vocab_merges

__all__ = ["build_tiny_z_image", "Z_IMAGE_SCHEDULER"]

# Tongyi-MAI/Z-Image-Turbo scheduler_config.json: a static shift of 3
Z_IMAGE_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
QWEN3_SPECIALS = QWEN_SPECIALS + ["<think>", "</think>"]
# Qwen3's chat template, reduced to what the pipeline uses (user turns, the generation prompt, thinking switch)
QWEN3_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
_CORPUS = ["a red circle on a blue background", "a green square, soft light", "a photo of a cat and a dog",
           "user assistant", "pink yellow purple orange dark light style sign"]


def _tokenizer(corpus: list[str] | None = None):
    """Qwen3's tokenizer shape (byte-level BPE, chat template, specials) with merges learned from ``corpus``."""
    from transformers import Qwen2Tokenizer

    vocab, merges = _vocab_merges(_bpe(QWEN3_SPECIALS, vocab_size=400, corpus=corpus or _CORPUS))
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", extra_special_tokens=QWEN3_SPECIALS[1:], model_max_length=4096)
    tok.chat_template = QWEN3_TEMPLATE
    return tok


def _text_encoder(tokenizer, hidden: int = 32):
    from transformers import Qwen3Config, Qwen3Model

    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                  max_position_embeddings=1024, pad_token_id=pad, bos_token_id=pad,
                                  eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>")))


def build_tiny_z_image(folder: str | Path, seed: int = 0) -> Path:
    """A tiny Z-Image-shaped ``ZImagePipeline`` folder. Returns the folder (kept when it already holds one)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    folder = Path(folder)
    if (folder / "model_index.json").exists():
        return folder
    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32,
                                           n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                                           axes_dims=[4, 6, 6], axes_lens=[256, 64, 64])
    with torch.no_grad():  # a trained model's pad tokens are not zero
        transformer.x_pad_token.normal_(std=0.02)
        transformer.cap_pad_token.normal_(std=0.02)
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**Z_IMAGE_SCHEDULER), vae=_flux_vae(),
                          text_encoder=_text_encoder(tokenizer), tokenizer=tokenizer, transformer=transformer)
    pipe.save_pretrained(folder)
    return folder
