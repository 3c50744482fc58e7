"""Z-Image on the flow-matching trainer: what this family adds to ``QwenImageTrainer`` (whose text placement,
padded text cache, quantized base, export check and file form it shares), read from diffusers' ``ZImagePipeline``
and ``examples/dreambooth/train_dreambooth_lora_z_image.py``.

- **Text** (encoded once, then the encoder leaves the GPU): Qwen3's second-to-last hidden state for the caption
  in Qwen3's chat template (``enable_thinking=True``), only the real tokens (the pipeline's ``encode_prompt``); the
  cache keeps them zero-padded with a mask, and each sample gets its own length back (the transformer takes a
  list).
- **Latents**: FLUX's 16-channel VAE with its shift and scaling factors, not packed: the transformer takes each
  latent as one frame ``(C, 1, h, w)`` and patches it 2x2 itself.
- **Time and target**: the model sees ``1 - sigma`` (the pipeline passes ``(1000 - t) / 1000``) and predicts
  ``latent - noise``, the negated velocity (the pipeline negates its output), so the loss compares its negation
  with ``noise - latent``.
- **Noise levels**: Z-Image-Turbo's scheduler shifts statically by 3: ``timestep_sampling: shift`` with
  ``discrete_flow_shift: 3`` (the presets).
- **LoRA layers** (``lora_targets``): ``attention`` = ``attention.to_q/to_k/to_v/to_out.0`` of the 30 main layers;
  ``all_linear`` adds the feed-forward ``w1/w2/w3``; ``train_double_block_indices`` keeps only some layers. The
  noise and context refiners are not trained.
- **Export**: ``diffusion_model.<diffusers name>.lora_A/lora_B/alpha``: ComfyUI's Lumina2/Z-Image map
  (``comfy.utils.z_image_to_diffusers``) takes ``diffusion_model.`` + these diffusers names (to_q/k/v become
  slices of its fused ``attention.qkv``); diffusers' ``ZImageLoraLoaderMixin`` strips the prefix and applies the
  alphas.
- **Rendering**: Z-Image-Turbo 9 steps without guidance; the base Z-Image 28 steps at guidance 4.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import TrainConfig
from ..families import Z_IMAGE_ALL_LINEAR, Z_IMAGE_ATTENTION
from .events import EventBus
from .flux import target_modules
from .qwen_image import QwenImageTrainer
from .run_folder import RunFolder

Z_IMAGE_BLOCKS = {"layers": "train_double_block_indices"}
BASE_RENDER = {"steps": 28, "cfg": 4.0}  # the undistilled Z-Image
# Layers ComfyUI's z_image_to_diffusers maps (relative to layers.N / noise_refiner.N / context_refiner.N), and the
# top-level ones
COMFY_BLOCK = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", "feed_forward.w1",
               "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0")
COMFY_TOP = ("all_final_layer.2-1.linear", "all_final_layer.2-1.adaLN_modulation.1", "all_x_embedder.2-1",
             "cap_embedder.1", "t_embedder.mlp.0", "t_embedder.mlp.2")
_BLOCK = re.compile(r"^(layers|noise_refiner|context_refiner)\.\d+\.(.+)$")


def comfy_maps_z_image(module: str) -> bool:
    """Whether ComfyUI's Z-Image key map places a LoRA on this transformer module path."""
    match = _BLOCK.match(module)
    return match.group(2) in COMFY_BLOCK if match else module in COMFY_TOP


def z_image_render_defaults(base_model: str, family: str) -> dict[str, float]:
    """``{"steps", "cfg"}``: Z-Image-Turbo (the registry's 9 / 0) unless the model is named as the undistilled base
    (``Z-Image``, ``Z-Image-Base``, as Tongyi-MAI publishes it: 28 / 4). The files do not tell the two apart."""
    from ..families import get_family

    name = Path(base_model.rstrip("/")).name.lower()
    if re.fullmatch(r"z[-_]?image([-_]base)?", name):
        return dict(BASE_RENDER)
    entry = get_family(family)
    return {"steps": entry.sample_steps, "cfg": entry.guidance_scale}


def z_image_velocity(transformer: torch.nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor,
                     embeds: list[torch.Tensor]) -> torch.Tensor:
    """The velocity ``noise - latent`` for latents (B, C, h, w) at noise levels ``sigmas``, from Z-Image's
    transformer with its pipeline's conventions: each latent is one frame, the model sees ``1 - sigma`` and
    predicts ``latent - noise`` (the pipeline negates it). One module-level function: the miniature's build trains
    with it, and a proof-of-learning test puts a wrong convention in its place to see the proof fail."""
    out = transformer(list(noisy.unsqueeze(2).unbind(0)), (1.0 - sigmas).to(noisy.dtype), embeds,
                      return_dict=False)[0]
    return -torch.stack(out).squeeze(2)


class ZImageTrainer(QwenImageTrainer):
    comfy_map = (comfy_maps_z_image, Z_IMAGE_ALL_LINEAR, "Z-Image")

    def __init__(self, config: TrainConfig, run: RunFolder, bus: EventBus, family: str = "z_image"):
        super().__init__(config, run, bus, family)

    def lora_target_modules(self) -> list[str]:
        if self._targets is None:
            self._targets = target_modules(self.denoiser, self.config, Z_IMAGE_ATTENTION, Z_IMAGE_ALL_LINEAR,
                                           Z_IMAGE_BLOCKS)
        return self._targets

    def latent_vae(self, vae):
        return vae  # FLUX's VAE: the cache applies its shift and scaling factors

    def encode_text(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        self._warn_long_captions(captions, "Qwen3")
        embeds, _ = self.pipe.encode_prompt(prompt=list(captions), device=self.text_device(),
                                            do_classifier_free_guidance=False,
                                            max_sequence_length=self.config.max_sequence_length)
        longest = max(e.shape[0] for e in embeds)
        padded = torch.stack([torch.cat([e, e.new_zeros(longest - e.shape[0], e.shape[1])]) for e in embeds])
        mask = torch.stack([torch.arange(longest, device=padded.device) < e.shape[0] for e in embeds]).long()
        return {"prompt_embeds": padded, "prompt_embeds_mask": mask}

    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        dev, dtype = noisy.device, noisy.dtype
        lengths = cond["prompt_embeds_mask"].sum(1).tolist()
        embeds = cond["prompt_embeds"].to(dev, dtype)
        return z_image_velocity(self.trained_denoiser(), noisy, sigmas, [e[:n] for e, n in zip(embeds, lengths)])

    def render_kwargs(self) -> dict[str, Any]:
        found = z_image_render_defaults(self.config.base_model, self.family)
        return {"num_inference_steps": int(found["steps"]), "guidance_scale": found["cfg"]}

    def metadata(self, step: int, epoch: int) -> dict[str, str]:
        meta = super().metadata(step, epoch)
        if meta.get("ss_network_module") == "networks.lora_qwen_image":
            meta["ss_network_module"] = "networks.lora_z_image"
        return meta
