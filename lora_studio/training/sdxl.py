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
- 1024 px default resolution (the family registry, ``families.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import TrainConfig
from ..errors import TrainingError
from .diffusion import VERIFY_SIZE, VERIFY_STEPS, DiffusionTrainer
from .events import EventBus
from .run_folder import RunFolder
from .runtime import free_memory, is_out_of_memory, weight_dtype

FP16_SAFE_VAE_HINT = "madebyollin/sdxl-vae-fp16-fix"


class SDXLTrainer(DiffusionTrainer):
    text_encoder_names = ("text_encoder", "text_encoder_2")

    def __init__(self, config: TrainConfig, run: RunFolder, bus: EventBus, family: str = "sdxl"):
        super().__init__(config, run, bus, family=family)

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
        """A sample beside training: VAE tiling at 1024 px, and out of memory skips it (a warning), not the run."""
        self.pipe.vae.enable_tiling()
        try:
            return super().render_sample(step)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            self.pipe.vae.to("cpu")
            free_memory()
            self.say(f"Sample at step {step} skipped: the GPU has no room to render it beside training.", "warning")
            return None
        finally:
            self._offload_text_encoders()

    @torch.no_grad()
    def verify(self, lora_file: Path):
        """The reload-and-compare check, on the CPU unless the GPU has room for two SDXL pipelines in fp32.

        The check compares the trained pipeline with a fresh one, both in fp32: about 14 GB each for SDXL,
        more than a 12-24 GB card holds. On the CPU it renders the same 64 px, 2-step images (seconds).
        """
        if not self._verify_on_cpu():
            return super().verify(lora_file)
        from ..export.verify import check_export

        self.say("Checking the export on the CPU (two SDXL pipelines in fp32 do not fit this GPU).")
        pipe = self.inference_pipe().to("cpu").to(torch.float32)
        expected, base = self._reference_renders(pipe)
        for name, dtype in self.held_dtypes.items():  # back as training held them: frees RAM for the fresh pipeline
            getattr(pipe, name).to(self.accelerator.device, dtype)
        return check_export(self.config.base_model, self.family, lora_file, expected_images=expected,
                            base_images=base, prompt=self.items[0].caption, seed=self.config.seed,
                            steps=VERIFY_STEPS, size=VERIFY_SIZE, vae=self.config.vae, device="cpu",
                            held_dtypes=self.held_dtypes, single_file_config=self.config.single_file_config)

    def _verify_on_cpu(self) -> bool:
        """True when training on a GPU without room for two fp32 pipelines (plus a quarter)."""
        device = self.accelerator.device
        if device.type != "cuda":
            return False
        modules = [self.pipe.unet, self.pipe.vae] + [getattr(self.pipe, n) for n in self.text_encoder_names]
        fp32_bytes = 4 * sum(p.numel() for m in modules for p in m.parameters())
        free, _ = torch.cuda.mem_get_info(device)
        return free < 2.5 * fp32_bytes
