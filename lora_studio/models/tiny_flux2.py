"""Tiny random-weight FLUX.2 pipelines built offline (klein and dev shapes): for the tests (and benchmarks).

It has the released klein models' structure: a ``Flux2KleinPipeline`` folder with a ``Qwen3ForCausalLM`` text
encoder (28 layers: the pipeline stacks hidden states 9, 18 and 27, so the transformer's text width is 3 x the
encoder's), a Qwen tokenizer with the ChatML template the pipeline applies (``enable_thinking=False``), an
``AutoencoderKLFlux2`` (32 latent channels, patchified 2x2 to 128 and normalised by its batch-norm statistics,
which are set to non-trivial values here so a trainer that skips them fails), a ``Flux2Transformer2DModel``
(double and single blocks, 4-axis RoPE, no guidance embedding) and the flow-matching scheduler with dynamic
shifting. ``distilled`` marks the pipeline as a step-distilled klein (4 steps, no CFG) instead of a base model.
The tokenizer is a byte-level BPE trained here with ``tokenizers`` (``models.tiny_vlms``); nothing touches the
network.

``build_tiny_flux2_dev`` is FLUX.2 [dev]'s ``Flux2Pipeline``: a ``Mistral3ForConditionalGeneration`` (a Mistral text
model of 30 layers, as the pipeline stacks hidden states 10, 20 and 30, with a one-layer Pixtral vision tower), the
transformer with its guidance embedding (dev is guidance-distilled), the same VAE and scheduler. Its tokenizer
holds Mistral's control tokens (``[SYSTEM_PROMPT]``, ``[INST]``, ``[IMG]`` ...) and a chat template that renders
the pipeline's messages (system message, then the caption; image blocks as ``[IMG]``) as Mistral Small 3.1's does.
The released model's tokenizer slot is a ``PixtralProcessor``, which transformers refuses to build without
torchvision (not installable next to a CPU torch from PyPI); ``encode_prompt`` only calls ``apply_chat_template``
on it, which the tokenizer implements the same way for text, so the tiny pipeline holds the tokenizer itself.
The pipeline's system message is one added token of the tiny vocabulary, so that 32 tokens still hold the caption.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .tiny_vlms import _qwen_tokenizer

__all__ = ["build_tiny_flux2_dev", "build_tiny_flux2_klein"]

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


def _transformer(guidance: bool):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * TEXT_WIDTH, timestep_guidance_channels=32, mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance)


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)


def build_tiny_flux2_klein(folder: str | Path, seed: int = 0, *, distilled: bool = False) -> Path:
    """A tiny klein-shaped ``Flux2KleinPipeline`` folder (kept when it already holds one). Returns it."""
    from diffusers import Flux2KleinPipeline

    folder = Path(folder)
    if (folder / "model_index.json").exists():
        return folder
    torch.manual_seed(seed)
    tokenizer = _qwen_tokenizer()
    tokenizer.chat_template = QWEN3_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")}
    transformer = _transformer(False)
    pipe = Flux2KleinPipeline(scheduler=_scheduler(), vae=_vae(), transformer=transformer, tokenizer=tokenizer,
                              text_encoder=_qwen3(len(tokenizer), ids["<|endoftext|>"], ids["<|im_end|>"]),
                              is_distilled=distilled)
    pipe.save_pretrained(folder)
    return folder


MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                    "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
# Mistral Small 3.1's template reduced to what Flux2Pipeline sends: a system message and user turns whose content
# is a list of text (and image) blocks.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}{% else %}"
    "{% set parts = namespace(text='') %}{% for block in message['content'] %}"
    "{% if block['type'] == 'text' %}{% set parts.text = parts.text + block['text'] %}"
    "{% else %}{% set parts.text = parts.text + '[IMG]' %}{% endif %}{% endfor %}{% set text = parts.text %}{% endif %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{{ text }}[/INST]"
    "{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}")


def _mistral_tokenizer():
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from transformers import PreTrainedTokenizerFast

    from .tiny_vlms import _CORPUS, _bpe

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_bpe(MISTRAL_SPECIALS, vocab_size=512, corpus=_CORPUS + [SYSTEM_MESSAGE]), bos_token="<s>",
        eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_special_tokens={"image_token": "[IMG]"},
        model_max_length=131072)
    tokenizer.add_tokens([SYSTEM_MESSAGE])
    tokenizer.chat_template = MISTRAL_TEMPLATE
    return tokenizer


def _mistral3(tokenizer):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<pad>", "[IMG]")}
    return Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=32,
                         num_hidden_layers=30, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         max_position_embeddings=1024, sliding_window=None, bos_token_id=ids["<s>"],
                         eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"]),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=8, image_size=32, patch_size=8),
        image_token_index=ids["[IMG]"], spatial_merge_size=2, vision_feature_layer=-1))


def build_tiny_flux2_dev(folder: str | Path, seed: int = 0) -> Path:
    """A tiny dev-shaped ``Flux2Pipeline`` folder (Mistral 3 text encoder, guidance embedding; kept when it already
    holds one). Returns it."""
    from diffusers import Flux2Pipeline

    folder = Path(folder)
    if (folder / "model_index.json").exists():
        return folder
    torch.manual_seed(seed)
    tokenizer = _mistral_tokenizer()
    transformer = _transformer(True)
    pipe = Flux2Pipeline(scheduler=_scheduler(), vae=_vae(), transformer=transformer, tokenizer=tokenizer,
                         text_encoder=_mistral3(tokenizer))
    pipe.save_pretrained(folder)
    return folder


def diffusers_to_bfl2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``Flux2Transformer2DModel`` state dict in Black Forest Labs' FLUX.2 layout (``double_blocks.N.img_attn.qkv``,
    ``single_blocks.N.linear1`` ...): the inverse of diffusers' ``convert_flux2_transformer_checkpoint_to_diffusers``."""
    top = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
           "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
           "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
           "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
           "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
           "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
           "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
           "single_stream_modulation.linear": "single_stream_modulation.lin"}
    double = {"attn.norm_q.weight": "img_attn.norm.query_norm.scale", "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
              "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
              "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale", "attn.to_out.0.weight": "img_attn.proj.weight",
              "attn.to_add_out.weight": "txt_attn.proj.weight", "ff.linear_in.weight": "img_mlp.0.weight",
              "ff.linear_out.weight": "img_mlp.2.weight", "ff_context.linear_in.weight": "txt_mlp.0.weight",
              "ff_context.linear_out.weight": "txt_mlp.2.weight"}
    single = {"attn.to_qkv_mlp_proj.weight": "linear1.weight", "attn.to_out.weight": "linear2.weight",
              "attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        kind, _, rest = key.partition(".")
        if kind == "transformer_blocks":
            index, _, name = rest.partition(".")
            if name in double:
                out[f"double_blocks.{index}.{double[name]}"] = value
        elif kind == "single_transformer_blocks":
            index, _, name = rest.partition(".")
            out[f"single_blocks.{index}.{single[name]}"] = value
        elif key.startswith("norm_out.linear."):
            shift, scale = value.chunk(2, dim=0)  # diffusers (scale, shift) -> BFL (shift, scale)
            out["final_layer.adaLN_modulation.1." + key.rsplit(".", 1)[1]] = torch.cat([scale, shift])
        else:
            module, _, end = key.rpartition(".")
            out[f"{top[module]}.{end}"] = value
    for index in {k.split(".")[1] for k in state if k.startswith("transformer_blocks.")}:
        for stream, parts in (("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            out[f"double_blocks.{index}.{stream}_attn.qkv.weight"] = torch.cat(
                [state[f"transformer_blocks.{index}.attn.{p}.weight"] for p in parts])
    return {k: v.contiguous() for k, v in out.items()}


def save_flux2_single_file(folder: str | Path, path: str | Path) -> Path:
    """The FLUX.2 transformer of the pipeline in ``folder`` as one ``.safetensors`` in BFL's layout."""
    from diffusers import Flux2Transformer2DModel
    from safetensors.torch import save_file

    transformer = Flux2Transformer2DModel.from_pretrained(Path(folder) / "transformer")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(diffusers_to_bfl2(transformer.state_dict()), str(path))
    return path
