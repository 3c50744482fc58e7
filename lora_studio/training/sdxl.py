"""The SDXL LoRA trainer: ``DiffusionTrainer`` with SDXL's two text encoders and size/crop conditioning.

What SDXL adds to the SD1.5 step:

- **Text**: both CLIP encoders run on the caption; the UNet gets the penultimate hidden states of both,
  concatenated (768 + 1280 = 2048 channels), plus the pooled, projected embedding of ``text_encoder_2``.
  The encoders are frozen by default, so each caption is encoded once (cached) and the encoders then
  leave the GPU; ``train_text_encoder: true`` puts a LoRA on both and encodes at every step.
- **Micro-conditioning** (``time_ids``): per image, the original size, the top-left corner of the crop
  taken from the resized image, and the training (bucket) size, each as (height, width), exactly as the
  SDXL pipeline builds them at inference.
- **VAE precision**: the SDXL VAE overflows to NaN in fp16, so latents are encoded in fp32 unless the
  ``vae`` key names a VAE that declares itself fp16-safe (``force_upcast: false`` in its config, as
  madebyollin/sdxl-vae-fp16-fix does). The cached latents are checked, and non-finite ones stop the run
  with a message naming the ``vae`` key: a NaN latent can never train silently.
- Memory: while latents are cached only the VAE is on the GPU, while captions are encoded only the text
  encoders, so neither phase adds to the training peak (UNet + LoRA + activations).
- 1024 px default resolution (``DEFAULT_RESOLUTION`` in ``diffusion.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import TrainConfig
from ..errors import TrainingError
from .diffusion import DiffusionTrainer
from .events import EventBus
from .run_folder import RunFolder
from .runtime import free_memory, weight_dtype

FP16_SAFE_VAE_HINT = "madebyollin/sdxl-vae-fp16-fix"


class SDXLTrainer(DiffusionTrainer):
    family = "sdxl"
    text_encoder_names = ("text_encoder", "text_encoder_2")

    def __init__(self, config: TrainConfig, run: RunFolder, bus: EventBus, family: str = "sdxl"):
        super().__init__(config, run, bus, family="sdxl")

    # --- VAE and latents -------------------------------------------------------------------------
    def vae_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """fp32 unless a ``vae`` is given that says it is safe in half precision (``force_upcast: false``)."""
        vae = getattr(self.pipe, "vae", None)
        fp16_safe = bool(self.config.vae) and vae is not None and not getattr(vae.config, "force_upcast", True)
        if dtype != torch.float32 and not fp16_safe:
            self.say("Encoding latents with the VAE in fp32 (the SDXL VAE overflows in fp16); set vae to an "
                     f"fp16-safe VAE such as {FP16_SAFE_VAE_HINT} to encode in half precision.")
            return torch.float32
        return dtype

    def _cache_latents(self) -> None:
        """Encode with only the VAE on the GPU (UNet and encoders wait in RAM), one image at a time: the
        caching peak then stays far below the training peak (see ``memory.py``)."""
        pipe, device = self.pipe, self.accelerator.device
        waiting = [pipe.unet] + [getattr(pipe, n) for n in self.text_encoder_names]
        for module in waiting:
            module.to("cpu")
        free_memory()
        pipe.vae.enable_slicing()
        try:
            super()._cache_latents()
        finally:
            for name in self.text_encoder_names:
                getattr(pipe, name).to(device)
            if self.config.train_text_encoder:  # no text caching follows: the UNet comes back now
                pipe.unet.to(device)
        self.check_latents()

    def check_latents(self) -> None:
        """Stop with a clear message if any cached latent is NaN or infinite."""
        bad = [self.items[i].path.name for i, entry in enumerate(self.latents.entries)
               if not (torch.isfinite(entry["mean"]).all() and torch.isfinite(entry["std"]).all())]
        if not bad:
            return
        dtype = str(self.pipe.vae.dtype).replace("torch.", "")
        names = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        vae = f"the VAE '{self.config.vae}' (vae key)" if self.config.vae else "the model's own VAE"
        disk = (f" Cached latents are kept in {Path(self.config.output_dir) / '.cache' / 'latents'}; delete that "
                "folder if it holds latents from a broken VAE." if self.config.cache_latents == "disk" else "")
        raise TrainingError(
            f"The VAE produced NaN/infinite latents for {len(bad)} of {len(self.items)} images ({names}), "
            f"encoding with {vae} in {dtype}. Training on them would silently ruin the LoRA, so the run stopped. "
            f"Leave the vae key empty to encode in fp32, or set vae to a working fp16-safe SDXL VAE such as "
            f"{FP16_SAFE_VAE_HINT}; check that the VAE file belongs to SDXL.{disk}")

    # --- text --------------------------------------------------------------------------------------
    def tokenize(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        out = {}
        for key, tok in (("input_ids", self.pipe.tokenizer), ("input_ids_2", self.pipe.tokenizer_2)):
            out[key] = tok(list(captions), padding="max_length", max_length=tok.model_max_length, truncation=True,
                           return_tensors="pt").input_ids
        return out

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Penultimate hidden states of both encoders, concatenated, and the pooled embedding of the second."""
        dev = self.accelerator.device
        out_1 = self.training_module("text_encoder")(tokens["input_ids"].to(dev), output_hidden_states=True)
        out_2 = self.training_module("text_encoder_2")(tokens["input_ids_2"].to(dev), output_hidden_states=True)
        hidden = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
        return {"encoder_hidden_states": hidden, "text_embeds": out_2.text_embeds}

    @torch.no_grad()
    def _cache_text(self) -> None:
        super()._cache_text()
        self._offload_text_encoders()
        self.pipe.unet.to(self.accelerator.device)  # after the encoders left: the peaks do not add up

    def _offload_text_encoders(self) -> None:
        """Frozen, cached encoders are not needed for training: free their GPU memory (about 1.6 GB in fp16)."""
        if self.config.train_text_encoder:
            return
        for name in self.text_encoder_names:
            getattr(self.pipe, name).to("cpu")
        free_memory()

    # --- the step ----------------------------------------------------------------------------------
    def time_ids(self, indices: Sequence[int]) -> torch.Tensor:
        """(batch, 6): original (h, w), crop top-left (top, left), target (h, w) for each item."""
        rows = []
        for i, (top, left) in zip(indices, self.latents.crops(indices)):
            item = self.items[i]
            (width, height), (bucket_w, bucket_h) = item.size, item.bucket
            rows.append([height, width, top, left, bucket_h, bucket_w])
        return torch.tensor(rows, dtype=torch.float32)

    def unet_kwargs(self, cond: dict[str, torch.Tensor], indices: Sequence[int]) -> dict[str, Any]:
        dev, dtype = self.accelerator.device, weight_dtype(self.accelerator)
        added = {"text_embeds": cond["text_embeds"].to(dev, dtype), "time_ids": self.time_ids(indices).to(dev, dtype)}
        return {"encoder_hidden_states": cond["encoder_hidden_states"], "added_cond_kwargs": added}

    # --- inference (samples, export check) ---------------------------------------------------------
    def inference_pipe(self):
        pipe = super().inference_pipe()
        for name in self.text_encoder_names:
            getattr(pipe, name).to(self.accelerator.device)
        return pipe

    @torch.no_grad()
    def render_sample(self, step: int) -> Path | None:
        path = super().render_sample(step)
        self._offload_text_encoders()
        return path
