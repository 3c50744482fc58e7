"""Tiny random-weight models built offline: for the tests, ``--demo`` and ``doctor``.

They have the same structure as the real ones (a diffusers pipeline folder with UNet, VAE, CLIP text
encoder(s), tokenizer(s) and scheduler), so every code path that loads, trains, exports and reloads a real
model runs on them in seconds on a CPU. Nothing here touches the network.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# The CLIP tokenizer is byte-level BPE: the 256 byte characters, the same with "</w>", a few merges.
_BYTE_MERGES = ["t h", "th e</w>", "a n", "i n", "e r", "o n", "r e", "a t", "s t", "e n"]


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_clip_tokenizer(folder: Path, max_length: int = 77, merges: list[str] | None = None) -> None:
    """Write vocab.json + merges.txt (+ configs) that ``CLIPTokenizer.from_pretrained(folder)`` loads.

    ``merges`` ("a b" pairs, in rank order) replaces the few built-in ones (the miniatures pass merges that
    make their words single tokens)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    merges = _BYTE_MERGES if merges is None else merges
    chars = _bytes_to_unicode()
    vocab_list = chars + [c + "</w>" for c in chars]
    for merge in merges:
        vocab_list.append(merge.replace(" ", ""))
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length,
                        pad_token="<|endoftext|>")
    tok.save_pretrained(folder)


def _clip_text_config(vocab_size: int, hidden: int = 32, projection: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=projection or hidden,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )


def _tiny_vae(channels: tuple[int, ...] = (16, 32), layers: int = 1):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels), block_out_channels=channels,
        layers_per_block=layers, latent_channels=4, norm_num_groups=8, sample_size=64,
    )


def _scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, prediction_type=prediction_type, steps_offset=1,
    )


def build_tiny_sd15(folder: str | Path, seed: int = 0, prediction_type: str = "epsilon",
                    unet_channels: tuple[int, int] = (32, 64), vae_channels: tuple[int, ...] = (16, 32),
                    vae_layers: int = 1) -> Path:
    """A tiny SD1.5-shaped pipeline saved as a diffusers folder. Returns the folder.

    The default is the smallest that exercises every code path; the benchmark passes larger channel
    counts so the VAE/UNet cost ratio is closer to the real model's.
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    if (folder / "model_index.json").exists():
        return folder
    torch.manual_seed(seed)
    tok_dir = folder / "tokenizer"
    write_clip_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    text_encoder = CLIPTextModel(_clip_text_config(len(tokenizer)))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=unet_channels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(vae_channels, vae_layers), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=_scheduler(prediction_type), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def build_tiny_sdxl(folder: str | Path, seed: int = 0) -> Path:
    """A tiny SDXL-shaped pipeline (two text encoders, added time ids) saved as a diffusers folder."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    if (folder / "model_index.json").exists():
        return folder
    torch.manual_seed(seed)
    write_clip_tokenizer(folder / "tokenizer")
    write_clip_tokenizer(folder / "tokenizer_2")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
    text_encoder = CLIPTextModel(_clip_text_config(len(tokenizer), hidden=32))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(len(tokenizer_2), hidden=32, projection=32))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
        transformer_layers_per_block=(1, 2), norm_num_groups=8,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=_scheduler(), force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(folder)
    return folder


def make_demo_images(folder: str | Path, count: int = 8, size: int = 64, seed: int = 0,
                     with_captions: bool = True) -> Path:
    """A small generated dataset (coloured shapes) with .txt captions, for tests and --demo."""
    import random

    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    rgb = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
           "purple": (140, 50, 170), "orange": (240, 140, 30)}
    for i in range(count):
        colour = colours[i % len(colours)]
        shape = "circle" if i % 2 == 0 else "square"
        img = Image.new("RGB", (size, size), (245, 240, 230))
        draw = ImageDraw.Draw(img)
        m = rng.randint(size // 8, size // 4)
        box = (m, m, size - m, size - m)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=rgb[colour])
        img.save(folder / f"img_{i:03d}.png")
        if with_captions:
            (folder / f"img_{i:03d}.txt").write_text(f"a {colour} {shape} on a light background", encoding="utf-8")
    return folder


# --- an A1111-style single file of a diffusers SD1.x folder -----------------------------------------------
_RESNET_TO_LDM = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                  ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_VAE_ATTN_TO_LDM = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def _rename(rest: str, pairs) -> str:
    for new, old in pairs:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def _to_ldm(sd: dict, part: str, prefix: str, name_of) -> dict:
    """diffusers weight names -> the original (LDM) ones: diffusers' own table for the fixed layers, else
    ``name_of(key.split("."))`` (the inverse of what ``from_single_file`` converts)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = DIFFUSERS_TO_LDM_MAPPING[part]["layers"] if part == "unet" else DIFFUSERS_TO_LDM_MAPPING[part]
    return {prefix + (fixed[key] if key in fixed else name_of(key.split("."))): value for key, value in sd.items()}


def _unet_name(p: list[str], layers: int, up_with_attention: list[bool]) -> str:
    if p[0] == "down_blocks" and p[2] == "downsamplers":
        return f"input_blocks.{(int(p[1]) + 1) * (layers + 1)}.0.op.{p[-1]}"
    if p[0] == "down_blocks":
        i, rest = 1 + int(p[1]) * (layers + 1) + int(p[3]), ".".join(p[4:])
        return f"input_blocks.{i}.0.{_rename(rest, _RESNET_TO_LDM)}" if p[2] == "resnets" else f"input_blocks.{i}.1.{rest}"
    if p[0] == "mid_block":  # resnet 0, attention, resnet 1
        rest = ".".join(p[3:])
        return (f"middle_block.{0 if p[2] == '0' else 2}.{_rename(rest, _RESNET_TO_LDM)}" if p[1] == "resnets"
                else f"middle_block.1.{rest}")
    if p[0] == "up_blocks" and p[2] == "upsamplers":
        b = int(p[1])
        return f"output_blocks.{b * (layers + 1) + layers}.{2 if up_with_attention[b] else 1}.conv.{p[-1]}"
    if p[0] == "up_blocks":
        i, rest = int(p[1]) * (layers + 1) + int(p[3]), ".".join(p[4:])
        return (f"output_blocks.{i}.0.{_rename(rest, _RESNET_TO_LDM)}" if p[2] == "resnets"
                else f"output_blocks.{i}.1.{rest}")
    raise ValueError(f"no original name for the UNet weight {'.'.join(p)}")


def _vae_name(p: list[str], blocks: int) -> str:
    if p[1] == "mid_block" and p[2] == "attentions":
        return f"{p[0]}.mid.attn_1.{_rename('.'.join(p[4:]), _VAE_ATTN_TO_LDM)}"
    if p[1] == "mid_block":
        return f"{p[0]}.mid.block_{int(p[3]) + 1}.{'.'.join(p[4:]).replace('conv_shortcut', 'nin_shortcut')}"
    if p[1] in ("down_blocks", "up_blocks"):
        down = p[1] == "down_blocks"
        b = int(p[2]) if down else blocks - 1 - int(p[2])
        level = "down" if down else "up"
        if p[3] in ("downsamplers", "upsamplers"):
            return f"{p[0]}.{level}.{b}.{'downsample' if down else 'upsample'}.conv.{p[-1]}"
        return f"{p[0]}.{level}.{b}.block.{p[4]}.{'.'.join(p[5:]).replace('conv_shortcut', 'nin_shortcut')}"
    raise ValueError(f"no original name for the VAE weight {'.'.join(p)}")


def save_as_single_file(folder: str | Path, path: str | Path) -> Path:
    """The SD1.x diffusers pipeline in ``folder`` as one A1111-style ``.safetensors`` checkpoint.

    Weights get the original (LDM) names that AUTOMATIC1111, ComfyUI and diffusers' ``from_single_file``
    read: ``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.*``. The tests
    use it to load a checkpoint file offline, as a creator loads one downloaded from a model site.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    folder, path = Path(folder), Path(path)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    up_attention = ["CrossAttn" in t for t in unet.config.up_block_types]
    state = _to_ldm(unet.state_dict(), "unet", "model.diffusion_model.",
                    lambda p: _unet_name(p, unet.config.layers_per_block, up_attention))
    state.update(_to_ldm(vae.state_dict(), "vae", "first_stage_model.",
                         lambda p: _vae_name(p, len(vae.config.up_block_types))))
    state.update({"cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k): v
                  for k, v in text_encoder.state_dict().items()})  # the original CLIP names (text_model.*)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path
