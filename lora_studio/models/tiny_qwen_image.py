"""A tiny random-weight Qwen-Image pipeline built offline: for the tests (and anyone who wants to try the family
without downloading 40 GB).

It has the released model's structure: a ``QwenImagePipeline`` folder with a Qwen2.5-VL text encoder (its
``mrope_section`` sums to half the head size, as the real one's), a Qwen tokenizer whose vocabulary holds the
words of the pipeline's prompt template, so the system part the pipeline drops is exactly 34 tokens as with
the real tokenizer, an ``AutoencoderKLQwenImage`` (the causal 3-D VAE, 16 latent channels) with the released
per-channel ``latents_mean`` / ``latents_std`` (so a trainer that skips the normalisation fails), a
``QwenImageTransformer2DModel`` (64 packed input channels) and the flow-matching scheduler with Qwen-Image's
dynamic shift settings. Nothing touches the network; the build takes about a second.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .tiny_vlms import QWEN_SPECIALS, _bpe, _vocab_merges

__all__ = ["build_tiny_qwen_image", "QWEN_IMAGE_SCHEDULER", "TEMPLATE_DROP"]

# Qwen-Image's released scheduler (Qwen/Qwen-Image scheduler_config.json): dynamic (resolution-dependent) shift.
QWEN_IMAGE_SCHEDULER = {"base_image_seq_len": 256, "max_image_seq_len": 8192, "base_shift": 0.5, "max_shift": 0.9,
                        "shift_terminal": 0.02, "use_dynamic_shifting": True, "time_shift_type": "exponential",
                        "num_train_timesteps": 1000, "shift": 1.0}
TEMPLATE_DROP = 34  # QwenImagePipeline.prompt_template_encode_start_idx
_TEMPLATE_WORDS = ("system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
                   "relationships of the objects and background:\nuser\nassistant\n")
_WORDS = "a an the on of in with and red green blue yellow pink circle square light dark photo style cat dog sign"


def _tokenizer(corpus: list[str] | None = None):
    """A Qwen2 tokenizer (byte-level BPE) that knows every word of the prompt template as one token; its other
    merges are learned from ``corpus`` (by default a few words)."""
    from transformers import Qwen2Tokenizer

    corpus = [_TEMPLATE_WORDS] + (corpus or [_WORDS, " ".join(_WORDS.split()[::-1])])
    vocab, merges = _vocab_merges(_bpe(QWEN_SPECIALS, vocab_size=600, corpus=corpus))
    return Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                          pad_token="<|endoftext|>", extra_special_tokens=QWEN_SPECIALS[1:], model_max_length=4096)


def check_template(tokenizer):
    """``tokenizer`` if it splits the system part of the pipeline's prompt template into ``TEMPLATE_DROP`` tokens, as
    the released tokenizer does (the pipeline drops that many); else an error."""
    prefix = "<|im_start|>system\n" + _TEMPLATE_WORDS.split("\n")[1] + "<|im_end|>\n<|im_start|>user\n"
    if len(tokenizer(prefix).input_ids) != TEMPLATE_DROP:
        raise RuntimeError("the tiny Qwen tokenizer does not split the prompt template into 34 tokens")
    return tokenizer


def _text_encoder(tokenizer, hidden: int = 32):
    import transformers

    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in QWEN_SPECIALS}
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[0])
    config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                                           image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                                           vision_start_token_id=ids["<|vision_start|>"],
                                           vision_end_token_id=ids["<|vision_end|>"])
    return transformers.Qwen2_5_VLForConditionalGeneration(config)


def build_tiny_qwen_image(folder: str | Path, seed: int = 0) -> Path:
    """A tiny Qwen-Image-shaped ``QwenImagePipeline`` folder. Returns the folder (kept when it already holds one)."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    folder = Path(folder)
    if (folder / "model_index.json").exists():
        return folder
    torch.manual_seed(seed)
    tokenizer = check_template(_tokenizer())
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                              axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                 temperal_downsample=[False, True, True])
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER), vae=vae,
                             text_encoder=_text_encoder(tokenizer), tokenizer=tokenizer, transformer=transformer)
    pipe.save_pretrained(folder)
    return folder
