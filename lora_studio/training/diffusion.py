"""The Stable Diffusion LoRA trainer (SD1.x and SD2.x; SDXL extends it in ``sdxl.py``).

What happens, in order: load the pipeline (frozen weights in half precision on a GPU), add PEFT adapters of
the ``network_type`` (LoRA, DoRA, LoKr, LoHa: ``networks.py``) to the UNet attention projections (and optionally
the text encoder), read and bucket the images (holding out the validation images, finding the loss masks),
encode their latents once (the VAE then leaves the GPU), encode the captions once when the text encoder is
frozen and the captions do not change from step to step, then each step: draw noise and timesteps, change the
caption (dropout, tag shuffling and dropout), predict, and take the (optionally min-SNR weighted, optionally
masked) MSE loss against the noise or the velocity. The validation loss is the same loss, unweighted, on the
held-out images with the latent mean, fixed noise and evenly spread timesteps.

Captions and cached text: with only ``caption_dropout_rate`` the empty caption is cached as one more entry; with
``shuffle_tags`` or ``tag_dropout_rate`` every step has new text, so the frozen encoders stay on the device and
encode each batch (measured in ``benchmarks/bench_captions.py``: about 1% of a step at full size).

Per-sample randomness (latent sample, noise, noise offset, timestep) comes from a generator seeded by the
sample's place in the epoch (``Batch.generators``), not from a running generator: a run is deterministic
and resumes exactly, and batch 2 on one GPU draws the same noise as batch 1 on each of two GPUs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import TrainConfig
from ..data.train_set import Batch, TrainItem, sample_seed
from ..families import get_family
from ..errors import DatasetError
from ..models.load_lock import model_loading
from ..models.loading import load_diffusion_pipeline
from .events import EventBus
from .image_trainer import ImageTrainer
from .run_folder import RunFolder
from .masked_loss import per_sample_mse
from .runtime import enable_checkpointing, full_precision_forward, weight_dtype
from .validation import even_timesteps

log = logging.getLogger(__name__)

VERIFY_STEPS, VERIFY_SIZE = 2, 64


class DiffusionTrainer(ImageTrainer):
    text_encoder_names = ("text_encoder",)

    def __init__(self, config: TrainConfig, run: RunFolder, bus: EventBus, family: str = "sd15"):
        super().__init__(config, run, bus, family)

    # --- setup ---------------------------------------------------------------------------------------
    def prepare(self) -> None:
        import time

        cfg = self.config
        self.started_at = time.time()
        self.read_images()
        self.bus.state("loading model")
        with model_loading(cfg.base_model):  # the model and its new LoRA layers, one load in the process at a time
            self._load_and_add_adapters()
        self._warn_long_captions()
        self.bus.state("caching latents")
        self._cache_latents()
        self.pipe.vae.to("cpu")
        if self.caches_text:
            self._cache_text()
        else:
            self._text_per_step()
        if cfg.gradient_checkpointing:
            self.pipe.unet.enable_gradient_checkpointing()
            if cfg.train_text_encoder:
                for name in self.text_encoder_names:
                    enable_checkpointing(getattr(self.pipe, name))
        self.say(f"Model: {cfg.base_model} ({self.family}), prediction type {self.prediction_type}, "
                 f"resolution {self.resolution}, weights {str(weight_dtype(self.accelerator)).replace('torch.', '')}, "
                 f"{cfg.network_type} rank {cfg.lora_rank} alpha {cfg.alpha:g} on "
                 f"{', '.join(cfg.targets_for(self.family))}.")

    def _text_per_step(self) -> None:
        """The captions change at every step (tag shuffling or dropout): the frozen encoders stay on the device."""
        if not self.config.train_text_encoder:
            self.say("shuffle_tags/tag_dropout_rate: the captions change at every step, so they are encoded at "
                     "every step (the text encoder stays on the GPU).")

    def _load_and_add_adapters(self) -> None:
        cfg, acc = self.config, self.accelerator
        dtype = weight_dtype(acc)
        self.pipe = pipe = load_diffusion_pipeline(cfg.base_model, self.family, vae=cfg.vae, report=self.say,
                                                   single_file_config=cfg.single_file_config)
        self.noise_scheduler = _training_scheduler(pipe.scheduler)
        self.prediction_type = (cfg.prediction_type if cfg.prediction_type != "auto"
                                else self.noise_scheduler.config.prediction_type)
        for module in self._frozen_modules():
            module.requires_grad_(False)
        pipe.unet.to(acc.device, dtype=dtype)
        for name in self.text_encoder_names:
            getattr(pipe, name).to(acc.device, dtype=dtype)
        pipe.vae.to(acc.device, dtype=self.vae_dtype(dtype))
        # What each frozen part is held in: the export check rounds a fresh pipeline the same way.
        self.held_dtypes = {name: dtype for name in ["unet", *self.text_encoder_names]}
        self.held_dtypes["vae"] = self.vae_dtype(dtype)
        self._add_adapters()

    def _warn_long_captions(self) -> None:
        """Captions longer than the tokenizer's limit (77 for CLIP) are cut: say how many, in the log."""
        from ..data.caption_length import count_too_long, too_long_message

        tok = self.pipe.tokenizer
        limit = int(tok.model_max_length)
        cut, total, longest = count_too_long([it.caption for it in self.items],
                                             lambda cs: [len(ids) for ids in tok(cs, truncation=False).input_ids],
                                             limit)
        if cut:
            self.say(too_long_message(cut, total, limit, longest), "warning")

    def vae_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype

    def _frozen_modules(self) -> list[torch.nn.Module]:
        return [self.pipe.unet, self.pipe.vae] + [getattr(self.pipe, n) for n in self.text_encoder_names]

    def _add_adapters(self) -> None:
        from diffusers.training_utils import cast_training_params

        from ..networks import add_network, peft_config

        cfg = self.config

        def add(model, targets) -> None:
            config = peft_config(cfg.network_type, cfg.lora_rank, cfg.alpha, targets, dropout=cfg.lora_dropout)
            add_network(model, cfg.network_type, config)

        add(self.pipe.unet, cfg.targets_for(self.family))
        trained = [self.pipe.unet]
        if cfg.train_text_encoder:
            for name in self.text_encoder_names:
                add(getattr(self.pipe, name), get_family(self.family).text_encoder_targets)
                trained.append(getattr(self.pipe, name))
        if cfg.init_lora:
            from ..export.lora_state import apply_init_lora

            apply_init_lora(self.pipe.unet, self._text_encoders(), cfg.init_lora, self.family)
            self.say(f"Continuing from the LoRA {cfg.init_lora}.")
        cast_training_params(trained, dtype=torch.float32)

    def _text_encoders(self) -> dict[str, torch.nn.Module]:
        return {name: getattr(self.pipe, name) for name in self.text_encoder_names}

    def _cache_latents(self) -> None:
        cfg = self.config
        self.cache_images(self.pipe.vae, f"{cfg.base_model}|{cfg.vae}")

    # --- text ------------------------------------------------------------------------------------
    def tokenize(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        tok = self.pipe.tokenizer
        ids = tok(list(captions), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return {"input_ids": ids}

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Text conditioning for the UNet: ``encoder_hidden_states`` (SDXL adds pooled embeddings)."""
        te = self.training_module("text_encoder")
        ids = tokens["input_ids"].to(self.accelerator.device)
        return {"encoder_hidden_states": te(ids)[0]}

    @torch.no_grad()
    def _cache_text(self) -> None:
        captions = self.caption_set()
        for start in range(0, len(captions), 16):
            chunk = captions[start:start + 16]
            out = self.encode_text(self.tokenize(chunk))
            for j, caption in enumerate(chunk):
                self.text_cache[caption] = {k: v[j].detach().to("cpu") for k, v in out.items()}

    def text_conditioning(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        if self.text_cache and all(c in self.text_cache for c in captions):
            return {k: torch.stack([self.text_cache[c][k] for c in captions]).to(self.accelerator.device)
                    for k in self.text_cache[captions[0]]}
        trained = self.config.train_text_encoder and not self._validating
        with torch.enable_grad() if trained else torch.no_grad():
            return self.encode_text(self.tokenize(captions))

    def training_module(self, name: str) -> torch.nn.Module:
        """``pipe.<name>`` as the step must call it: through its DDP wrapper once the loop prepared it
        (a trained text encoder called around the wrapper would skip the gradient all-reduce)."""
        module = getattr(self.pipe, name)
        if self._validating:  # the validation runs on the main process alone: no DDP wrapper (no collectives)
            return module
        for prepared in self.prepared_models:
            if self.accelerator.unwrap_model(prepared) is module:
                return prepared
        return module

    # --- the step --------------------------------------------------------------------------------
    def models(self) -> list[torch.nn.Module]:
        mods = [self.pipe.unet]
        if self.config.train_text_encoder:
            mods += [getattr(self.pipe, n) for n in self.text_encoder_names]
        return mods

    def param_groups(self) -> list[dict[str, Any]]:
        cfg = self.config
        groups = [{"params": [p for p in self.pipe.unet.parameters() if p.requires_grad], "lr": cfg.learning_rate}]
        if cfg.train_text_encoder:
            te_params = [p for n in self.text_encoder_names for p in getattr(self.pipe, n).parameters()
                         if p.requires_grad]
            groups.append({"params": te_params, "lr": cfg.text_encoder_lr or cfg.learning_rate})
        return groups

    def unet_kwargs(self, cond: dict[str, torch.Tensor], items: Sequence[TrainItem],
                    crops: Sequence[tuple[int, int]]) -> dict[str, Any]:
        return {"encoder_hidden_states": cond["encoder_hidden_states"]}

    def compute_loss(self, batch: list[int]) -> torch.Tensor:
        cfg = self.config
        # one generator per sample, seeded by its place in the epoch (a plain list: the run's generator)
        gens = batch.generators(cfg.seed) if isinstance(batch, Batch) else [self.generator] * len(batch)
        latents = self.latents.sample(batch, gens)
        shape = latents.shape[1:]
        noise = torch.stack([torch.randn(shape, generator=g) for g in gens])
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.stack([torch.randn((shape[0], 1, 1), generator=g) for g in gens])
        n_train = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.cat([torch.randint(0, n_train, (1,), generator=g) for g in gens])
        captions = self.step_captions(batch)
        items = [self.items[i] for i in batch]
        per_sample = self.denoise_loss(latents, noise, timesteps, captions, items, self.latents.crops(batch),
                                       self.step_masks(batch))
        return per_sample.mean()

    def denoise_loss(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                     captions: Sequence[str], items: Sequence[TrainItem], crops: Sequence[tuple[int, int]],
                     masks: torch.Tensor | None = None, weighted: bool = True) -> torch.Tensor:
        """Per-sample (masked) MSE of the UNet's prediction against the noise or the velocity; min-SNR weighted
        when ``weighted`` and ``min_snr_gamma`` is set."""
        acc = self.accelerator
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = training_target(self.noise_scheduler, self.prediction_type, latents, noise, timesteps)
        dev, dtype = acc.device, weight_dtype(acc)
        unet = self.pipe.unet if self._validating else self.prepared_models[0]
        cond = self.text_conditioning(captions)
        with acc.autocast():
            pred = unet(noisy.to(dev, dtype), timesteps.to(dev),
                        **{k: v.to(dtype) if torch.is_tensor(v) else v
                           for k, v in self.unet_kwargs(cond, items, crops).items()}).sample
        per_sample = per_sample_mse(pred, target.to(dev), masks)
        if weighted and self.config.min_snr_gamma:
            per_sample = per_sample * self._snr_weights(timesteps).to(dev)
        return per_sample

    # --- validation ------------------------------------------------------------------------------
    def validation_loss(self, index: int) -> torch.Tensor:
        """One held-out image at timesteps spread evenly over the schedule, with the latent mean and noise fixed
        by the seed and the image's place: the same number for the same weights, every time."""
        item, entry = self.val_items[index], self.val_latents.entries[index]
        steps = even_timesteps(self.noise_scheduler.config.num_train_timesteps)
        k = len(steps)
        latents = entry["mean"].float().unsqueeze(0).expand(k, *entry["mean"].shape)
        gen = torch.Generator(device="cpu").manual_seed(sample_seed(self.config.seed, -1, index, 0))
        noise = torch.randn(latents.shape, generator=gen)
        crops = self.val_latents.crops([index]) * k
        masks = self.val_latents.masks([index] * k) if self.config.masked_loss else None
        self._validating = True
        try:
            return self.denoise_loss(latents, noise, torch.tensor(steps), [item.caption] * k, [item] * k, crops,
                                     masks, weighted=False)
        finally:
            self._validating = False

    def _snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.noise_scheduler, timesteps)
        weights = torch.clamp(snr, max=self.config.min_snr_gamma)
        return weights / (snr + 1) if self.prediction_type == "v_prediction" else weights / snr

    # --- weights ---------------------------------------------------------------------------------
    def _peft_states(self) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
        from peft.utils import get_peft_model_state_dict

        unwrap = self.accelerator.unwrap_model
        unet_sd = get_peft_model_state_dict(unwrap(self.pipe.unet))
        te_sds = {}
        if self.config.train_text_encoder:
            te_sds = {n: get_peft_model_state_dict(unwrap(getattr(self.pipe, n))) for n in self.text_encoder_names}
        return unet_sd, te_sds

    def trainable_state(self) -> dict[str, torch.Tensor]:
        unet_sd, te_sds = self._peft_states()
        out = {f"unet.{k}": v for k, v in unet_sd.items()}
        for name, sd in te_sds.items():
            out.update({f"{name}.{k}": v for k, v in sd.items()})
        return out

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft.utils import set_peft_model_state_dict

        unwrap = self.accelerator.unwrap_model
        for name in ("unet",) + self.text_encoder_names:
            part = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            if part:
                result = set_peft_model_state_dict(unwrap(getattr(self.pipe, name)), part)
                unexpected = getattr(result, "unexpected_keys", None)
                if unexpected:
                    raise DatasetError(f"checkpoint does not match the model ({len(unexpected)} unexpected keys)")

    def _kohya_state(self) -> dict[str, torch.Tensor]:
        from ..export.kohya import peft_to_kohya

        unet_sd, te_sds = self._peft_states()
        return peft_to_kohya(unet_sd, te_sds, self.family, self.config.alpha, unet_config=self.pipe.unet.config,
                             rank=self.config.lora_rank)

    def _metadata(self, step: int, epoch: int) -> dict[str, str]:
        from ..data.tags import tag_frequency
        from ..export.metadata import build_kohya_metadata

        cfg = self.config
        return build_kohya_metadata(
            output_name=cfg.output_name, family=self.family, rank=cfg.lora_rank, alpha=cfg.alpha,
            resolution=self.resolution, num_train_images=len(self.items),
            tag_frequency=tag_frequency({it.path: it.caption for it in self.items}, cfg.train_data_dir),
            base_model_name=Path(cfg.base_model).name or cfg.base_model, training_started_at=self.started_at,
            steps=step, epoch=epoch, extra=self._metadata_extra())

    def _metadata_extra(self) -> dict[str, str]:
        from ..networks import kohya_network_metadata

        extra = kohya_network_metadata(self.config)
        if self.prediction_type == "v_prediction":
            extra["ss_v_parameterization"] = "True"
        return extra

    def save_lora(self, folder: Path, name: str, step: int, epoch: int) -> list[Path]:
        from ..export.kohya import save_kohya_lora

        return [save_kohya_lora(folder / f"{name}.safetensors", self._kohya_state(), self._metadata(step, epoch))]

    # --- export and checks -----------------------------------------------------------------------
    def inference_pipe(self):
        """The pipeline with the trained (unwrapped) UNet and text encoders, in eval mode, VAE on the device."""
        pipe = self.pipe
        pipe.unet = self.accelerator.unwrap_model(pipe.unet)
        pipe.vae.to(self.accelerator.device)
        return pipe

    def export(self, step: int, epoch: int) -> list[Path]:
        from ..export.diffusers_format import save_diffusers_lora
        from ..export.kohya import save_kohya_lora

        cfg, run = self.config, self.run
        kohya_path = save_kohya_lora(run.path / f"{cfg.output_name}.safetensors", self._kohya_state(),
                                     self._metadata(step, epoch))
        files = [kohya_path]
        if cfg.network_type == "lora":  # diffusers' own format holds plain LoRA only (DoRA there is PEFT's kind)
            unet_sd, te_sds = self._peft_states()
            files.append(save_diffusers_lora(run.path / "diffusers", type(self.pipe), unet_sd, te_sds,
                                             rank=cfg.lora_rank, alpha=cfg.alpha, family=self.family))
        if cfg.verify_export:
            self.bus.state("verifying export")
            report = self.verify(kohya_path)
            self.say(f"Export check passed: {report}")
            self.warn_if_little_effect(report.effect, report.atol, "the test image")
        from ..data.tags import tag_frequency

        self.write_card(step, files, tag_frequency({it.path: it.caption for it in self.items}, cfg.train_data_dir),
                        captions=[it.caption for it in self.items], num_images=len(self.items))
        return files

    @torch.no_grad()
    def verify(self, lora_file: Path):
        """Reload the written file into a fresh pipeline; it must reproduce the trained model (and the base)."""
        from ..export.verify import check_export

        pipe = self.inference_pipe()
        pipe.to(torch.float32)
        expected, base = self._reference_renders(pipe)
        return check_export(self.config.base_model, self.family, lora_file, expected_images=expected,
                            base_images=base, prompt=self.items[0].caption, seed=self.config.seed,
                            steps=VERIFY_STEPS, size=VERIFY_SIZE, vae=self.config.vae, device=self.accelerator.device,
                            held_dtypes=self.held_dtypes, single_file_config=self.config.single_file_config)

    def _reference_renders(self, pipe):
        """The trained pipeline's float32 render, and the same with the adapters off (the base).

        Rendered without accelerate's autocast wrapper (``full_precision_forward``): the fresh pipeline the
        check compares with runs in float32, so the trained one must too.
        """
        from ..export.verify import render

        prompt, seed = self.items[0].caption, self.config.seed
        pipe.set_progress_bar_config(disable=True)  # two 2-step renders: a bar would only add noise
        trained = [pipe.unet] + ([getattr(pipe, n) for n in self.text_encoder_names]
                                 if self.config.train_text_encoder else [])
        with full_precision_forward(*trained):
            expected = render(pipe, prompt, seed, VERIFY_STEPS, VERIFY_SIZE)
            for module in trained:
                module.disable_adapters()
            try:
                base = render(pipe, prompt, seed, VERIFY_STEPS, VERIFY_SIZE)
            finally:
                for module in trained:
                    module.enable_adapters()
        return expected, base

    @torch.no_grad()
    def render_sample(self, step: int) -> Path | None:
        pipe = self.inference_pipe()
        size = self.resolution
        gen = torch.Generator(device="cpu").manual_seed(self.config.seed)
        with self.accelerator.autocast():
            image = pipe(self.config.sample_prompt, num_inference_steps=20, height=size, width=size,
                         generator=gen).images[0]
        pipe.vae.to("cpu")
        return self.run.save_sample(step, image)


def training_target(scheduler, prediction_type: str, latents: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict: the velocity for v-prediction, else the noise (epsilon).

    One module-level function, so the proof-of-learning tests can swap in a wrong objective and show that
    their measurements then fail."""
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def _training_scheduler(scheduler):
    """A DDPMScheduler with the pipeline's noise schedule (the inference scheduler may be another kind)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler.config)
