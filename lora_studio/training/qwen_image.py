"""Qwen-Image on the flow-matching trainer: what this family adds to ``FluxTrainer`` (whose loading with a
quantized base, export check and metadata it shares), read from diffusers' ``QwenImagePipeline`` and
``examples/dreambooth/train_dreambooth_lora_qwen_image.py``.

- **Text** (encoded once, then the encoder leaves the GPU): Qwen2.5-VL's last hidden state for the caption in
  the pipeline's chat template, the template's first 34 tokens (its system prompt) dropped, through the
  pipeline's own ``encode_prompt``; the mask of real tokens is kept (captions differ in length; a batch is
  zero-padded to its longest, as the pipeline pads).
- **Latents**: the causal 3-D VAE (``AutoencoderKLQwenImage``) encodes an image as one frame; each of the 16
  channels is normalised with the VAE's ``latents_mean`` / ``latents_std`` (``QwenLatents``: what the pipeline
  undoes before decoding), then packed 2x2 into tokens as the pipeline packs them; ``img_shapes`` gives the
  transformer the token grid.
- **Time and target** (``qwen_image_velocity``): the model sees ``sigma`` (the pipeline passes ``t / 1000``) and
  predicts the velocity ``noise - latent`` itself.
- **Noise levels**: ``flux_shift`` is Qwen-Image's own dynamic shift (``mu`` from the token count with the
  model's scheduler settings, base 256 / max 8192 tokens, shift 0.5 to 0.9), as the pipeline shifts at inference.
- **LoRA layers** (``lora_targets``): ``attention`` = q, k, v and out of the image and text streams of every block
  (``to_q, to_k, to_v, to_out.0, add_q_proj, add_k_proj, add_v_proj, to_add_out``); ``all_linear`` adds both
  streams' feed-forward layers. ``train_double_block_indices`` keeps only some of the 60 blocks.
- **Export**: ``diffusion_model.<diffusers name>.lora_A/lora_B/alpha`` (``export/flux_lora.py``): ComfyUI maps
  ``diffusion_model.<name>`` for every weight of its QwenImage model, whose names are diffusers' (``comfy/lora.py``,
  ``model_lora_keys_unet``); diffusers' ``QwenImageLoraLoaderMixin`` strips the prefix and applies the alphas (with
  ``transformer.`` keys and alphas its converter would double the prefix and place nothing).
- **Rendering**: true classifier-free guidance (``true_cfg_scale`` 4 with a negative prompt, 50 steps).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Sequence

import torch

from ..config import TrainConfig
from ..families import QWEN_ALL_LINEAR, QWEN_ATTENTION
from .events import EventBus
from .flux import FluxTrainer, target_modules
from .run_folder import RunFolder

QWEN_BLOCKS = {"transformer_blocks": "train_double_block_indices"}
NEGATIVE = " "     # the pipeline's own examples use a blank negative prompt for true CFG


class QwenLatents:
    """The Qwen-Image VAE as the latent cache reads a VAE: ``encode(images)`` of (B, 3, H, W) gives a distribution
    of (B, 16, h, w) latents already normalised per channel (``(z - latents_mean) / latents_std``), so the cache's
    own scale and shift are 1 and 0."""

    def __init__(self, vae):
        self.vae = vae
        self.config = SimpleNamespace(scaling_factor=1.0, shift_factor=0.0)
        z = vae.config.z_dim
        self.mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1)
        self.std = torch.tensor(vae.config.latents_std).view(1, z, 1, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    def encode(self, pixels: torch.Tensor) -> SimpleNamespace:
        dist = self.vae.encode(pixels.unsqueeze(2)).latent_dist  # one frame
        mean, std = self.mean.to(pixels.device), self.std.to(pixels.device)
        normalised = SimpleNamespace(mean=(dist.mean[:, :, 0].float() - mean) / std,
                                     std=dist.std[:, :, 0].float() / std)
        return SimpleNamespace(latent_dist=normalised)


def comfy_maps_qwen(module: str) -> bool:
    """ComfyUI maps ``diffusion_model.<name>`` (also ``transformer.<name>`` and the bare name) for every weight of
    its QwenImage model, whose names are diffusers' (diffusers' single-file loader maps them one to one):
    ``comfy/lora.py``, ``model_lora_keys_unet``. So any layer of the transformer is placed (``check_placement``
    checks that it is one)."""
    return bool(module) and not module.endswith(".")


def qwen_render_defaults(base_model: str, family: str) -> dict[str, float]:
    """``{"steps", "cfg"}`` for the Testing tab and ``generate`` (the registry's: 50 steps, true CFG 4)."""
    from ..families import get_family

    entry = get_family(family)
    return {"steps": entry.sample_steps, "cfg": entry.guidance_scale}


def qwen_image_velocity(transformer: torch.nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor, embeds: torch.Tensor,
                        mask: torch.Tensor) -> torch.Tensor:
    """The velocity ``noise - latent`` for latents (B, C, h, w) at noise levels ``sigmas``, from Qwen-Image's
    transformer with its pipeline's conventions: 2x2-packed tokens on a (1, h/2, w/2) grid, the model sees ``sigma``
    (the pipeline passes ``t / 1000``) and predicts the velocity itself. One module-level function: the miniature's
    build trains with it, and a proof-of-learning test puts a wrong convention in its place to see the proof fail."""
    from diffusers import QwenImagePipeline

    b, c, h, w = noisy.shape
    dtype = noisy.dtype
    packed = QwenImagePipeline._pack_latents(noisy, b, c, h, w)
    out = transformer(hidden_states=packed, timestep=sigmas.to(dtype), encoder_hidden_states=embeds.to(dtype),
                      encoder_hidden_states_mask=mask, img_shapes=[(1, h // 2, w // 2)] * b, return_dict=False)[0]
    # unpacked as the pipeline unpacks (without its frame axis)
    return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


class QwenImageTrainer(FluxTrainer):
    text_encoder_names = ("text_encoder",)
    transformer_loader = "lora_studio.models.flow_loading:load_flow_transformer"
    file_prefix = "diffusion_model."
    # (whether ComfyUI places a module, the layer names to suggest, its model's name)
    comfy_map = (comfy_maps_qwen, QWEN_ALL_LINEAR, "QwenImage")

    def __init__(self, config: TrainConfig, run: RunFolder, bus: EventBus, family: str = "qwen_image"):
        super().__init__(config, run, bus, family)

    def lora_target_modules(self) -> list[str]:
        if self._targets is None:
            self._targets = target_modules(self.denoiser, self.config, QWEN_ATTENTION, QWEN_ALL_LINEAR, QWEN_BLOCKS)
        return self._targets

    def cache_images(self, vae, vae_id: str, **kwargs) -> None:
        super().cache_images(self.latent_vae(vae), vae_id, **kwargs)

    def latent_vae(self, vae):
        """The VAE as the latent cache reads it: Qwen-Image's normalised per channel (``QwenLatents``)."""
        return QwenLatents(vae)

    # --- text ---------------------------------------------------------------------------------------
    def encode_text(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        self._warn_long_captions(captions, "Qwen2.5-VL")
        embeds, mask = self.pipe.encode_prompt(prompt=list(captions), device=self.text_device(),
                                               max_sequence_length=self.config.max_sequence_length)
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}

    # --- the step -----------------------------------------------------------------------------------
    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        dev = noisy.device
        return qwen_image_velocity(self.trained_denoiser(), noisy, sigmas, cond["prompt_embeds"].to(dev),
                                   cond["prompt_embeds_mask"].to(dev))

    # --- files and checks ---------------------------------------------------------------------------
    def render_kwargs(self) -> dict[str, Any]:
        found = qwen_render_defaults(self.config.base_model, self.family)
        return {"num_inference_steps": int(found["steps"]), "true_cfg_scale": found["cfg"],
                "negative_prompt": NEGATIVE}

    def metadata(self, step: int, epoch: int) -> dict[str, str]:
        meta = super().metadata(step, epoch)
        meta.pop("ss_guidance_scale", None)  # no guidance input
        if meta.get("ss_network_module") == "networks.lora_flux":
            meta["ss_network_module"] = "networks.lora_qwen_image"
        return meta

    def check_placement(self, state: dict[str, torch.Tensor]) -> int:
        """Every LoRA layer is a layer of the transformer and in ComfyUI's key map of the family (``comfy_map``)."""
        from ..export.flux_lora import check_placement

        maps, known, model = self.comfy_map
        return check_placement(state, self.accelerator.unwrap_model(self.denoiser), maps=maps, known=known,
                               model=model)
