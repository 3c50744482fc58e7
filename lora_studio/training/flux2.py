"""FLUX.2 (klein with Qwen3; dev with Mistral 3) on the flow-matching trainer: what this family adds to
``FluxTrainer`` (whose quantized loading, export check and metadata it shares), as diffusers'
``train_dreambooth_lora_flux2_klein.py`` / ``_flux2.py`` and the pipelines do it.

- **Text** (encoded once, then the encoder leaves the GPU): the pipeline's own ``encode_prompt``: the caption in
  the chat template (klein: Qwen3 with thinking off; dev: Mistral 3 with the pipeline's system message),
  ``max_sequence_length`` tokens, hidden states of three layers (klein 9, 18, 27; dev 10, 20, 30) stacked along the
  width. Text ids come from the sequence length at each step.
- **Latents**: the VAE's 32 channels, cached as they come; at each step normalised by the VAE's batch-norm
  statistics (per channel of the 2x2-patchified 128-channel layout, applied here in the unpatchified layout so that
  loss masks stay on the latent grid), patchified 2x2 and packed into tokens for the transformer (4-axis ids from
  ``_prepare_latent_ids``), and the prediction unpacked back. The loss is over the same numbers in another order.
- **Timesteps**: the model sees ``sigma`` (the pipelines pass ``t / 1000``); dev's guidance embedding gets
  ``guidance_scale`` at every step, as ``train_dreambooth_lora_flux2.py`` feeds it (that script's default is 3.5;
  this config's is 1.0, as for FLUX.1-dev), klein has none.
- **LoRA layers** (``lora_targets``): ``attention`` = q, k, v and out of both streams in the double blocks and the
  single blocks' fused ``attn.to_qkv_mlp_proj``; ``all_linear`` adds the feed-forward layers and ``attn.to_out``.
- **Export**: ``transformer.*`` keys with the scale folded into ``lora_B`` (``export/sd3_lora.save_folded_lora``:
  diffusers' FLUX.2 loader refuses alpha keys), every layer in ComfyUI's FLUX table, which covers FLUX.2's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import TrainConfig
from ..families import FLUX2_ALL_LINEAR, FLUX2_ATTENTION
from .events import EventBus
from .flux import FluxTrainer, target_modules
from .run_folder import RunFolder


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2), channel ``4c + 2i + j`` from pixel (2y + i, 2x + j) (the pipelines')."""
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline._patchify_latents(latents)


def bn_normalize(latents: torch.Tensor, vae) -> torch.Tensor:
    """Latents (B, 32, H, W) as the transformer sees them: normalised by the VAE's batch-norm statistics of the
    patchified layout, tiled back onto the 2x2 grid they came from."""
    bn, eps = vae.bn, vae.config.batch_norm_eps
    mean = bn.running_mean.detach().float().cpu().view(-1, 2, 2)
    std = torch.sqrt(bn.running_var.detach().float().cpu() + eps).view(-1, 2, 2)
    reps = (1, latents.shape[-2] // 2, latents.shape[-1] // 2)
    return (latents - mean.repeat(*reps).to(latents.device)) / std.repeat(*reps).to(latents.device)


def flux2_velocity(transformer: torch.nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor, embeds: torch.Tensor,
                   guidance: torch.Tensor | None = None) -> torch.Tensor:
    """The velocity ``noise - latent`` for normalised latents (B, C, H, W) from FLUX.2's transformer, as its
    pipelines call it: patchified 2x2 and packed into tokens with 4-axis ids, the model shown ``sigma``. The
    miniature's build trains with it too."""
    from diffusers import Flux2KleinPipeline as Pipe

    b, c, h, w = noisy.shape
    patches = patchify(noisy)
    embeds = embeds.to(noisy.dtype)
    out = transformer(hidden_states=Pipe._pack_latents(patches), encoder_hidden_states=embeds,
                      timestep=sigmas.to(noisy.dtype), img_ids=Pipe._prepare_latent_ids(patches).to(noisy.device),
                      txt_ids=Pipe._prepare_text_ids(embeds).to(noisy.device), guidance=guidance,
                      return_dict=False)[0]
    unpacked = out.reshape(b, h // 2, w // 2, 4 * c).permute(0, 3, 1, 2)
    return Pipe._unpatchify_latents(unpacked)


class Flux2Trainer(FluxTrainer):
    text_encoder_names = ("text_encoder",)
    network_module = "networks.lora_flux2"
    transformer_loader = "lora_studio.models.flux2_loading:load_flux2_transformer"

    def __init__(self, config: TrainConfig, run: RunFolder, bus: EventBus, family: str = "flux2"):
        super().__init__(config, run, bus, family)

    # --- loading (the pipeline through the registry entry's pipeline_loader) ---------------------------
    def lora_target_modules(self) -> list[str]:
        if self._targets is None:
            self._targets = target_modules(self.denoiser, self.config, FLUX2_ATTENTION, FLUX2_ALL_LINEAR)
        return self._targets

    # --- text ---------------------------------------------------------------------------------------
    def encode_text(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        embeds, _ = self.pipe.encode_prompt(prompt=list(captions), device=self.text_device(),
                                            max_sequence_length=self.sequence_length())
        return {"prompt_embeds": embeds}

    # --- the step -----------------------------------------------------------------------------------
    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return bn_normalize(latents, self.pipe.vae)

    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        guided = self.accelerator.unwrap_model(self.denoiser).config.guidance_embeds
        guidance = torch.full((len(noisy),), self.config.guidance_scale, device=noisy.device) if guided else None
        return flux2_velocity(self.trained_denoiser(), noisy, sigmas, cond["prompt_embeds"], guidance)

    # --- files --------------------------------------------------------------------------------------
    def render_kwargs(self) -> dict[str, Any]:
        from ..families import get_family
        from ..models.flux2_loading import render_settings

        entry = get_family(self.family)
        found = render_settings(dict(self.pipe.config), entry.sample_steps, entry.guidance_scale)
        return {"guidance_scale": found["cfg"], "num_inference_steps": found["steps"]}

    def metadata(self, step: int, epoch: int) -> dict[str, str]:
        """kohya's keys; ``modelspec.architecture`` names klein or dev (its pipeline class)."""
        meta = super().metadata(step, epoch)
        dev = type(self.pipe).__name__ == "Flux2Pipeline"
        meta["modelspec.architecture"] = f"flux-2-{'dev' if dev else 'klein'}/lora"
        return meta

    def write_lora(self, path: Path, step: int, epoch: int) -> Path:
        from ..export.sd3_lora import save_folded_lora

        state = self.peft_state()
        self.check_placement(state)  # ComfyUI's FLUX table, which holds FLUX.2's layers
        return save_folded_lora(path, state, rank=self.config.lora_rank, alpha=self.config.alpha,
                                metadata=self.metadata(step, epoch))
