"""SD3 / SD3.5 (Large, Medium, Large Turbo) on the flow-matching trainer: what this family adds to
``FluxTrainer`` (whose quantized loading, export check and metadata it shares).

- **Text** (encoded once: CLIP-L + CLIP-G, then T5, take turns on the GPU, then they leave it): CLIP-L's and
  CLIP-G's penultimate hidden states (joined, padded to T5's width) and pooled projections, and T5-XXL's sequence
  (``max_sequence_length`` tokens; SD3.5 was trained with 256), joined as the pipeline's ``encode_prompt`` joins
  them (its own ``_get_clip_prompt_embeds`` / ``_get_t5_prompt_embeds``), as diffusers'
  ``train_dreambooth_lora_sd3.py`` does. A pipeline loaded without T5 (``text_encoder_3=None``) gets zeros there.
- **Latents**: 16 channels with the VAE's shift and scaling factors (cached), unpacked: the transformer patches
  them 2x2 itself. Buckets are multiples of 64 px, so every latent side is a multiple of the patch size.
- **Timesteps**: the model sees ``1000 sigma`` (the scheduler's timesteps). SD3.5's scheduler shifts its noise
  levels by 3 (``shift``); the presets train with ``timestep_sampling: shift`` and ``discrete_flow_shift: 3``,
  which is what the reference script's sampling through the shifted scheduler gives.
- **LoRA layers** (``lora_targets``): ``attention`` = q, k, v and out of the image and text streams, and of
  Medium's second attention (``attn2``); ``all_linear`` adds both streams' feed-forward layers.
  ``train_double_block_indices`` keeps only some of the MMDiT blocks.
- **Export**: ``export/sd3_lora.py`` (``transformer.*`` keys, the scale folded into ``lora_B``: diffusers'
  SD3 loader refuses alpha keys); the export check reloads the file into a fresh pipeline and counts the
  layers placed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import TrainConfig
from ..families import SD3_ALL_LINEAR, SD3_ATTENTION
from .events import EventBus
from .flux import FluxTrainer, target_modules
from .run_folder import RunFolder
from .runtime import free_memory

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
NO_T5_WIDTH = 4096  # the released models' joint_attention_dim: what a pipeline without T5 fills with zeros


def joined(clip: dict[str, torch.Tensor], t5: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD3's conditioning from its parts: CLIP-L + CLIP-G states padded to T5's width, then T5's (along the
    sequence), and the two pooled projections (``encode_prompt``'s joining)."""
    states = torch.nn.functional.pad(clip["clip"], (0, t5["t5"].shape[-1] - clip["clip"].shape[-1]))
    return {"prompt_embeds": torch.cat([states, t5["t5"].to(states.dtype)], dim=-2), "pooled": clip["pooled"]}


def sd3_velocity(transformer: torch.nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor, embeds: torch.Tensor,
                 pooled: torch.Tensor) -> torch.Tensor:
    """The velocity ``noise - latent`` from SD3's transformer for latents (B, C, h, w) at noise levels ``sigmas``:
    it sees ``1000 sigma`` (the scheduler's timesteps). The miniature's build trains with it too."""
    dtype = noisy.dtype
    return transformer(hidden_states=noisy, timestep=(sigmas * 1000).to(dtype), pooled_projections=pooled.to(dtype),
                       encoder_hidden_states=embeds.to(dtype), return_dict=False)[0]


class SD3Trainer(FluxTrainer):
    network_module = "networks.lora_sd3"
    transformer_loader = "lora_studio.models.sd3_loading:load_sd3_transformer"

    def __init__(self, config: TrainConfig, run: RunFolder, bus: EventBus, family: str = "sd3"):
        super().__init__(config, run, bus, family)

    @property
    def text_encoder_names(self) -> tuple[str, ...]:  # T5 may be left out of a pipeline (text_encoder_3=None)
        return tuple(n for n in TEXT_ENCODERS if self.pipe is None or getattr(self.pipe, n, None) is not None)

    # --- loading (the pipeline through the registry entry's pipeline_loader) ---------------------------
    def lora_target_modules(self) -> list[str]:
        if self._targets is None:
            self._targets = target_modules(self.denoiser, self.config, SD3_ATTENTION, SD3_ALL_LINEAR,
                                           {"transformer_blocks": "train_double_block_indices"})
        return self._targets

    # --- text ---------------------------------------------------------------------------------------
    def encode_text(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """The pipeline's ``encode_prompt`` (without CFG) in its two parts: CLIP-L + CLIP-G, then T5."""
        return joined(self._clip_part(captions), self._t5_part(captions))

    def _clip_part(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        dev, prompts = self.accelerator.device, list(captions)
        one, pooled_one = self.pipe._get_clip_prompt_embeds(prompt=prompts, device=dev, clip_model_index=0)
        two, pooled_two = self.pipe._get_clip_prompt_embeds(prompt=prompts, device=dev, clip_model_index=1)
        return {"clip": torch.cat([one, two], dim=-1), "pooled": torch.cat([pooled_one, pooled_two], dim=-1)}

    def _t5_part(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        length = self.sequence_length()
        if getattr(self.pipe, "text_encoder_3", None) is None:  # as the pipeline: zeros (released width)
            return {"t5": torch.zeros(len(captions), length, NO_T5_WIDTH, device=self.accelerator.device)}
        self._warn_long_captions(captions)
        return {"t5": self.pipe._get_t5_prompt_embeds(prompt=list(captions), max_sequence_length=length,
                                                      device=self.accelerator.device)}

    @torch.no_grad()
    def _cache_text(self) -> None:
        """As the shared cache, but CLIP-L + CLIP-G and then T5-XXL take turns on the device (all three at once
        need 11.2 GB in bf16, more than a 12 GB card leaves)."""
        if not self.caches_text:
            return super()._cache_text()
        captions = self.caption_set()
        clip = self._in_turn(("text_encoder", "text_encoder_2"), captions, self._clip_part)
        t5 = self._in_turn(("text_encoder_3",), captions, self._t5_part)
        self.text_cache.update({c: joined(clip[c], t5[c]) for c in captions})

    def _in_turn(self, names: Sequence[str], captions: Sequence[str], encode) -> dict[str, dict[str, torch.Tensor]]:
        """``encode`` over every caption (8 at a time) with only the encoders ``names`` on the device."""
        encoders = [getattr(self.pipe, n) for n in names if getattr(self.pipe, n, None) is not None]
        out: dict[str, dict[str, torch.Tensor]] = {}
        for encoder in encoders:
            encoder.to(self.accelerator.device)
        try:
            for start in range(0, len(captions), 8):
                chunk = captions[start:start + 8]
                part = encode(chunk)
                out.update({c: {k: v[j].detach().to("cpu") for k, v in part.items()} for j, c in enumerate(chunk)})
        finally:
            for encoder in encoders:
                encoder.to("cpu")
            free_memory()
        return out

    def _warn_long_captions(self, captions: Sequence[str]) -> None:
        tokenizer, limit = self.pipe.tokenizer_3, self.sequence_length()
        long = [c for c in captions if len(tokenizer(c).input_ids) > limit]
        if long:
            self.say(f"{len(long)} caption(s) are longer than max_sequence_length {limit} T5 tokens and are cut "
                     f"(CLIP sees 77), e.g. '{long[0][:60]}...'. Shorten them or raise max_sequence_length.",
                     "warning")

    # --- the step -----------------------------------------------------------------------------------
    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return sd3_velocity(self.trained_denoiser(), noisy, sigmas, cond["prompt_embeds"], cond["pooled"])

    # --- files --------------------------------------------------------------------------------------
    def render_kwargs(self) -> dict[str, Any]:
        from ..models.sd3_loading import render_defaults

        return render_defaults(self.config.base_model, self.accelerator.unwrap_model(self.denoiser).config)

    def metadata(self, step: int, epoch: int) -> dict[str, str]:
        """kohya's keys; ``modelspec.architecture`` names Large or Medium (sd-scripts' names)."""
        from ..models.sd3_loading import model_kind

        meta = super().metadata(step, epoch)
        kind = model_kind(self.config.base_model, self.accelerator.unwrap_model(self.denoiser).config)
        meta["modelspec.architecture"] = f"stable-diffusion-v3-5-{'medium' if kind == 'medium' else 'large'}/lora"
        return meta

    def check_placement(self, state: dict[str, torch.Tensor]) -> int:
        """Every LoRA layer is a layer of the MMDiT and in ComfyUI's SD3 key map (``mmdit_to_diffusers``)."""
        from ..export.flux_lora import check_placement
        from ..export.sd3_lora import COMFY_SD3_BLOCK, comfy_maps_sd3

        return check_placement(state, self.accelerator.unwrap_model(self.denoiser), comfy_maps_sd3, COMFY_SD3_BLOCK,
                               "SD3")

    def write_lora(self, path: Path, step: int, epoch: int) -> Path:
        from ..export.sd3_lora import save_folded_lora

        state = self.peft_state()
        self.check_placement(state)
        return save_folded_lora(path, state, rank=self.config.lora_rank, alpha=self.config.alpha,
                                metadata=self.metadata(step, epoch))
