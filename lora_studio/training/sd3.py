"""SD3 / SD3.5 (Large, Medium, Large Turbo) on the flow-matching trainer: what this family adds to
``FluxTrainer`` (whose quantized loading, export check and metadata it shares).

- **Text** (encoded once, then the encoders leave the GPU): CLIP-L and CLIP-G (penultimate hidden states,
  joined, padded to T5's width, and their pooled projections) and T5-XXL (``max_sequence_length`` tokens; SD3.5
  was trained with 256), through the pipeline's own ``encode_prompt``, as diffusers'
  ``train_dreambooth_lora_sd3.py`` does. A pipeline loaded without T5 (``text_encoder_3=None``) gets the zeros
  the pipeline puts in its place.
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

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


class SD3Trainer(FluxTrainer):
    network_module = "networks.lora_sd3"

    def __init__(self, config: TrainConfig, run: RunFolder, bus: EventBus, family: str = "sd3"):
        super().__init__(config, run, bus, family)

    @property
    def text_encoder_names(self) -> tuple[str, ...]:  # T5 may be left out of a pipeline (text_encoder_3=None)
        return tuple(n for n in TEXT_ENCODERS if self.pipe is None or getattr(self.pipe, n, None) is not None)

    # --- loading ------------------------------------------------------------------------------------
    def pipeline_files(self, **kwargs):
        from ..models.sd3_loading import load_sd3_pipeline

        cfg = self.config
        return load_sd3_pipeline(cfg.base_model, self.family, single_file_config=cfg.single_file_config, **kwargs)

    def transformer_files(self, **kwargs) -> torch.nn.Module:
        from ..models.sd3_loading import load_sd3_transformer

        cfg = self.config
        return load_sd3_transformer(cfg.base_model, self.family, single_file_config=cfg.single_file_config, **kwargs)

    def lora_target_modules(self) -> list[str]:
        if self._targets is None:
            self._targets = target_modules(self.denoiser, self.config, (SD3_ATTENTION, SD3_ALL_LINEAR))
        return self._targets

    # --- text ---------------------------------------------------------------------------------------
    def encode_text(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        if getattr(self.pipe, "tokenizer_3", None) is not None:
            self._warn_long_captions(captions)
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=list(captions), prompt_2=None, prompt_3=None, device=self.accelerator.device,
            do_classifier_free_guidance=False, max_sequence_length=self.config.max_sequence_length)
        return {"prompt_embeds": embeds, "pooled": pooled}

    def _warn_long_captions(self, captions: Sequence[str]) -> None:
        tokenizer, limit = self.pipe.tokenizer_3, self.config.max_sequence_length
        long = [c for c in captions if len(tokenizer(c).input_ids) > limit]
        if long:
            self.say(f"{len(long)} caption(s) are longer than max_sequence_length {limit} T5 tokens and are cut "
                     f"(CLIP sees 77), e.g. '{long[0][:60]}...'. Shorten them or raise max_sequence_length.",
                     "warning")

    # --- the step -----------------------------------------------------------------------------------
    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = noisy.dtype
        return self.trained_denoiser()(
            hidden_states=noisy, timestep=(sigmas * 1000).to(dtype), encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            pooled_projections=cond["pooled"].to(dtype), return_dict=False)[0]

    # --- files --------------------------------------------------------------------------------------
    def render_kwargs(self) -> dict[str, Any]:
        from ..models.sd3_loading import render_defaults

        return render_defaults(self.config.base_model, self.accelerator.unwrap_model(self.denoiser).config)

    def write_lora(self, path: Path, step: int, epoch: int) -> Path:
        from ..export.flux_lora import check_placement
        from ..export.sd3_lora import COMFY_SD3_BLOCK, comfy_maps_sd3, save_sd3_lora

        state = self.peft_state()
        check_placement(state, self.accelerator.unwrap_model(self.denoiser), comfy_maps_sd3, "SD3", COMFY_SD3_BLOCK)
        return save_sd3_lora(path, state, rank=self.config.lora_rank, alpha=self.config.alpha,
                             metadata=self.metadata(step, epoch))
