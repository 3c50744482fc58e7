"""A tiny random-weight SD3.5-shaped pipeline built offline: for the tests (and benchmarks).

It has the released models' structure: a ``StableDiffusion3Pipeline`` folder with two CLIP text encoders with
projection (CLIP-L and CLIP-G: penultimate hidden states and pooled projections), a T5 encoder (the sequence the
CLIP states are padded to and joined with), a 16-channel VAE with SD3's own scaling and shift factors, an
``SD3Transformer2DModel`` (MMDiT, patch size 2, RMS q/k norms, one dual-attention block as SD3.5 Medium's
MMDiT-X has; ``medium=False`` leaves it out, as SD3.5 Large) and the flow-matching scheduler with SD3's static
shift 3. Tokenizers are built with the ``tokenizers`` library (``models.tiny`` / ``models.tiny_flux``); nothing
touches the network.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .tiny import _clip_text_config, write_clip_tokenizer
from .tiny_flux import _flux_vae, _t5_encoder, write_t5_tokenizer

__all__ = ["build_tiny_sd3", "SD3_VAE_FACTORS"]

# SD3 / SD3.5's VAE: 16 latent channels, these factors (kept so a trainer that skips them fails).
SD3_VAE_FACTORS = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
CLIP_WIDTH, T5_WIDTH = 32, 64  # the pipeline pads CLIP-L + CLIP-G (2 x 32) to T5's width


def build_tiny_sd3(folder: str | Path, seed: int = 0, *, medium: bool = True) -> Path:
    """A tiny SD3.5-shaped ``StableDiffusion3Pipeline`` folder (kept when it already holds one). Returns it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    if (folder / "model_index.json").exists():
        return folder
    torch.manual_seed(seed)
    for name in ("tokenizer", "tokenizer_2"):
        write_clip_tokenizer(folder / name)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
    tokenizer_3 = write_t5_tokenizer(folder / "tokenizer_3")
    encoders = [CLIPTextModelWithProjection(_clip_text_config(len(tokenizer), hidden=CLIP_WIDTH)) for _ in range(2)]
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=T5_WIDTH, caption_projection_dim=16, pooled_projection_dim=2 * CLIP_WIDTH,
        out_channels=16, pos_embed_max_size=32, dual_attention_layers=(0,) if medium else (), qk_norm="rms_norm")
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_flux_vae(factors=SD3_VAE_FACTORS),
        text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1], tokenizer_2=tokenizer_2,
        text_encoder_3=_t5_encoder(len(tokenizer_3), d_model=T5_WIDTH), tokenizer_3=tokenizer_3,
        transformer=transformer)
    pipe.save_pretrained(folder)
    return folder


def _swapped(weight: torch.Tensor) -> torch.Tensor:
    """Shift and scale halves exchanged (diffusers' order vs Stability's; its own inverse)."""
    shift, scale = weight.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def diffusers_to_sai(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """An ``SD3Transformer2DModel`` state dict in Stability's single-file layout (``joint_blocks.N.x_block...``),
    the inverse of diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers``, under ``model.diffusion_model.``."""
    out = {"pos_embed": state["pos_embed.pos_embed"], "final_layer.linear.weight": state["proj_out.weight"],
           "final_layer.linear.bias": state["proj_out.bias"]}
    top = {"x_embedder.proj": "pos_embed.proj", "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
           "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2", "context_embedder": "context_embedder",
           "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
           "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2"}
    for end in ("weight", "bias"):
        out.update({f"{sai}.{end}": state[f"{ours}.{end}"] for sai, ours in top.items()})
        out[f"final_layer.adaLN_modulation.1.{end}"] = _swapped(state[f"norm_out.linear.{end}"])
    for i in range(num_layers):
        ours, sai, last = f"transformer_blocks.{i}.", f"joint_blocks.{i}.", i == num_layers - 1
        fused = {"x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                 "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                 "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v")}
        plain = {"x_block.attn.proj": "attn.to_out.0", "context_block.attn.proj": "attn.to_add_out",
                 "x_block.attn2.proj": "attn2.to_out.0", "x_block.adaLN_modulation.1": "norm1.linear",
                 "context_block.adaLN_modulation.1": "norm1_context.linear", "x_block.mlp.fc1": "ff.net.0.proj",
                 "x_block.mlp.fc2": "ff.net.2", "context_block.mlp.fc1": "ff_context.net.0.proj",
                 "context_block.mlp.fc2": "ff_context.net.2"}
        norms = {"x_block.attn.ln_q": "attn.norm_q", "x_block.attn.ln_k": "attn.norm_k",
                 "context_block.attn.ln_q": "attn.norm_added_q", "context_block.attn.ln_k": "attn.norm_added_k",
                 "x_block.attn2.ln_q": "attn2.norm_q", "x_block.attn2.ln_k": "attn2.norm_k"}
        for end in ("weight", "bias"):
            for name, parts in fused.items():
                if ours + parts[0] + "." + end in state:
                    out[f"{sai}{name}.{end}"] = torch.cat([state[f"{ours}{p}.{end}"] for p in parts])
            for name, part in plain.items():
                if ours + part + "." + end in state:
                    value = state[f"{ours}{part}.{end}"]
                    out[f"{sai}{name}.{end}"] = _swapped(value) if last and part == "norm1_context.linear" else value
        out.update({f"{sai}{name}.weight": state[f"{ours}{part}.weight"] for name, part in norms.items()
                    if f"{ours}{part}.weight" in state})
    return {f"model.diffusion_model.{k}": v.contiguous() for k, v in out.items()}


def save_sd3_single_file(folder: str | Path, path: str | Path) -> Path:
    """The SD3 transformer of the pipeline in ``folder`` as one ``.safetensors`` in Stability's layout."""
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import save_file

    transformer = SD3Transformer2DModel.from_pretrained(Path(folder) / "transformer")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(diffusers_to_sai(transformer.state_dict(), len(transformer.transformer_blocks)), str(path))
    return path
