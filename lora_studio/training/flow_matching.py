"""The flow-matching LoRA trainer shared by FLUX.1 and Chroma now, and the next transformer families later
(Qwen-Image, Z-Image, SD3.5, FLUX.2): what differs per family is a handful of methods (see ``FlowMatchingTrainer``).

The objective (rectified flow, as diffusers' ``train_dreambooth_lora_flux.py`` and sd-scripts train it): for a
clean latent ``x`` and noise ``n``, a noise level ``sigma`` in (0, 1) gives the input ``(1 - sigma) x + sigma n``;
the model predicts the velocity ``n - x``; the loss is the mean squared error, optionally weighted per sample
(``loss_weighting``: ``sigma_sqrt`` or ``cosmap``, ``diffusers.training_utils.compute_loss_weighting_for_sd3``).
The model sees ``sigma`` as its timestep (the pipelines pass ``t / 1000`` with ``t = 1000 sigma``).

Network types (``networks.py``), caption dropout/shuffling, masked loss and the validation loss are the shared
ones (``ImageTrainer``, ``masked_loss.py``); the validation loss takes noise levels at the centres of equal parts
of (0, 1) with fixed noise. With ``shuffle_tags`` / ``tag_dropout_rate`` the captions change every step, so the
text encoders stay on the device and encode each batch (T5-XXL: about 9.5 GB more GPU memory in bf16).

Noise levels (``timestep_sampling``, ``sample_sigmas``): ``uniform``; ``sigmoid`` (sigmoid of a standard normal,
sd-scripts' default); ``logit_normal`` (sigmoid of N(logit_mean, logit_std), the SD3 paper's); ``shift``
(sigmoid, then ``s t / (1 + (s - 1) t)`` with ``s = discrete_flow_shift``: towards noise for s > 1);
``flux_shift`` (sigmoid, then FLUX's resolution-dependent shift ``e^mu / (e^mu + 1/t - 1)`` with ``mu`` from the
image's token count, exactly as the FLUX pipeline shifts its schedule at inference). Sigmas are kept in
[0.001, 1] so ``sigma_sqrt`` (``1 / sigma^2``) stays finite.

What ``prepare`` does, in an order that keeps the GPU peak low: read the images (``preflight``), load the
pipeline without its transformer, encode every image once with only the VAE on the GPU (latents cached with
the VAE's shift and scaling factors), encode every caption once with only the text encoders on the GPU (then
they go back to the CPU: the step never needs them), and only then load the transformer (optionally quantized,
``training/quantize.py``) and add the LoRA. Per-sample randomness (latent sample, noise, sigma) comes from a
generator seeded by the sample's place in the epoch, so runs are deterministic and resume exactly.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import TrainConfig
from ..data.train_set import Batch, sample_seed
from ..errors import ConfigError, DatasetError
from ..models.load_lock import model_loading
from .events import EventBus
from .image_trainer import ImageTrainer
from .masked_loss import per_sample_mse
from .run_folder import RunFolder
from .runtime import free_memory, full_precision_forward, weight_dtype

SIGMA_MIN = 1e-3
VERIFY_STEPS, VERIFY_SIZE = 2, 64
TEXT_ROOM = 1.2  # the text encoders' weights and a fifth more for their activations must be free on the GPU


def shift_mu(image_seq_len: int, scheduler_config: Any) -> float:
    """FLUX's ``mu`` for an image of ``image_seq_len`` packed tokens (the pipeline's ``calculate_shift``)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    get = scheduler_config.get if hasattr(scheduler_config, "get") else lambda k, d: getattr(scheduler_config, k, d)
    return calculate_shift(image_seq_len, get("base_image_seq_len", 256), get("max_image_seq_len", 4096),
                           get("base_shift", 0.5), get("max_shift", 1.15))


def sample_sigmas(method: str, generators: Sequence[torch.Generator], *, logit_mean: float = 0.0,
                  logit_std: float = 1.0, shift: float = 3.0, mu: float | None = None) -> torch.Tensor:
    """One noise level in [0.001, 1] per generator, drawn as ``timestep_sampling`` ``method`` says."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    draws = []
    for g in generators:
        if method == "uniform":
            u = compute_density_for_timestep_sampling("uniform", 1, generator=g)
        elif method == "logit_normal":
            u = compute_density_for_timestep_sampling("logit_normal", 1, logit_mean, logit_std, generator=g)
        else:  # sigmoid, and the base of shift / flux_shift
            u = torch.sigmoid(torch.randn(1, generator=g))
        draws.append(u)
    t = torch.cat(draws).double()
    if method == "shift":
        t = shift * t / (1 + (shift - 1) * t)
    elif method == "flux_shift":
        if mu is None:
            raise ValueError("flux_shift needs mu (the image's token count through shift_mu)")
        t = math.exp(mu) / (math.exp(mu) + (1 / t.clamp(min=1e-12) - 1))
    return t.clamp(SIGMA_MIN, 1.0).float()


def flow_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the model learns to predict: the velocity ``noise - latents``. One module-level function, so that the
    proof-of-learning tests can put a wrong objective in its place and see the proof fail."""
    return noise - latents


def loss_weights(method: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights (``loss_weighting``); ones for ``none``."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(method, sigmas=sigmas.float()).float()


def stack_padded(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensors stacked; a family whose text length varies by caption (Qwen-Image, Z-Image: their masks say
    which tokens are real) gets the shorter ones zero-padded at the end, as its pipeline pads a batch."""
    longest = max(t.shape[0] for t in tensors)
    return torch.stack([t if t.shape[0] == longest else
                        torch.cat([t, t.new_zeros(longest - t.shape[0], *t.shape[1:])]) for t in tensors])


@contextlib.contextmanager
def lora_as_stored(model: torch.nn.Module, dtypes: Sequence[torch.dtype] = (torch.float16,)):
    """The trainable (LoRA) weights rounded through each of ``dtypes`` in turn for a while: as the LoRA file
    stores them (fp16), then as diffusers loads them into a half-precision model (its dtype)."""
    # DoRA's magnitude is stored in float32 (export.kohya): it keeps its precision
    kept = [(p, p.data) for n, p in model.named_parameters() if p.requires_grad and "lora_magnitude_vector" not in n]
    for p, data in kept:
        rounded = data
        for dtype in dtypes:
            rounded = rounded.to(dtype)
        p.data = rounded.to(data.dtype)
    try:
        yield
    finally:
        for p, data in kept:
            p.data = data


class FlowMatchingTrainer(ImageTrainer):
    """The shared trainer. A family subclass provides (see ``training/flux.py``):

    - ``load_pipeline(dtype)``: the pipeline without its transformer (VAE, text encoders, tokenizers, scheduler);
    - ``load_denoiser(dtype)``: the transformer, quantized as ``self.quantization`` says, on the device;
    - ``lora_target_modules()``: full module paths of the transformer that get a LoRA;
    - ``encode_text(captions)``: conditioning tensors per caption (dict of batched tensors), cached once;
    - ``predict(noisy, sigmas, cond)``: the velocity for latents (B, C, h, w) (packing is the family's business);
    - ``write_lora(path, step, epoch)``: the user-facing LoRA file; ``verify(path)``: the export check;
    - ``render_kwargs()``: guidance and steps for sample images;
    - ``normalize_latents(latents)`` (optional): normalisation beyond the VAE's scalar factors (FLUX.2's batch norm).
    """

    denoiser_name = "transformer"
    text_encoder_names: tuple[str, ...] = ()

    def __init__(self, config: TrainConfig, run: RunFolder, bus: EventBus, family: str):
        super().__init__(config, run, bus, family)
        self.quantization = "none"
        self.held_dtypes: dict[str, torch.dtype] = {}
        self.block_swap = None  # block_swap.BlockSwap with blocks_to_swap
        self._text_device: torch.device | None = None  # text_device(), decided once

    # --- family hooks -------------------------------------------------------------------------------
    def load_pipeline(self, dtype: torch.dtype):
        raise NotImplementedError

    def load_denoiser(self, dtype: torch.dtype, device: torch.device | None = None) -> torch.nn.Module:
        raise NotImplementedError

    def lora_target_modules(self) -> list[str]:
        raise NotImplementedError

    def encode_text(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def write_lora(self, path: Path, step: int, epoch: int) -> Path:
        raise NotImplementedError

    def verify(self, lora_file: Path):
        raise NotImplementedError

    def render_kwargs(self) -> dict[str, Any]:
        return {}

    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Cached latents (the VAE's scalar shift and scaling applied) as the model sees them; a family with more
        normalisation (FLUX.2's batch-norm statistics) overrides this."""
        return latents

    def sequence_length(self) -> int:
        """The prompt length in tokens the text is encoded with (``max_sequence_length``)."""
        return self.config.max_sequence_length

    # --- setup --------------------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    def prepare(self) -> None:
        from .quantize import usable_quantization

        cfg, acc = self.config, self.accelerator
        self.started_at = time.time()
        self.read_images()
        if cfg.train_text_encoder:
            self.say("train_text_encoder is not supported for this family: the LoRA trains the transformer only.",
                     "warning")
        self.bus.state("loading model")
        dtype = weight_dtype(acc)
        self.quantization = usable_quantization(cfg.base_quantization, acc.device, self.say)
        with model_loading(cfg.base_model):  # one model load in the process at a time
            self.pipe = self.load_pipeline(dtype)
        for name in ("vae",) + self.text_encoder_names:
            getattr(self.pipe, name).requires_grad_(False).to(dtype=dtype)
            self.held_dtypes[name] = dtype
        self.bus.state("caching latents")
        self._cache_latents()
        self._cache_text()
        self.bus.state("loading model")
        with model_loading(cfg.base_model):  # the transformer and its new LoRA layers (in CPU memory to swap blocks)
            setattr(self.pipe, self.denoiser_name,
                    self.load_denoiser(dtype, torch.device("cpu") if cfg.blocks_to_swap else None))
            self.denoiser.requires_grad_(False)
            self.held_dtypes[self.denoiser_name] = dtype
            self._add_adapters()
        if cfg.blocks_to_swap:
            self._swap_blocks()
        if cfg.gradient_checkpointing:
            from .block_swap import checkpoint_function

            self.denoiser.enable_gradient_checkpointing(checkpoint_function if self.block_swap else None)
        self.say(f"Model: {cfg.base_model} ({self.family}), resolution {self.resolution}, weights "
                 f"{str(dtype).replace('torch.', '')}, base {self.quantization}, {cfg.network_type} rank "
                 f"{cfg.lora_rank} alpha "
                 f"{cfg.alpha:g} on {len(self.lora_target_modules())} layers, timestep sampling "
                 f"{cfg.timestep_sampling}, loss weighting {cfg.loss_weighting}.")

    def _swap_blocks(self) -> None:
        """``blocks_to_swap``: the last blocks' frozen weights stay in CPU memory (``block_swap.py``), then the rest of
        the transformer goes to the device; the whole transformer never is on it at once. A count above the model's
        blocks (a preset made for a larger model of the family) swaps them all, said once."""
        from .block_swap import BlockSwap, repeated_blocks

        count, total = self.config.blocks_to_swap, len(repeated_blocks(self.denoiser))
        if not total:
            raise ConfigError("blocks_to_swap", "this transformer has no repeated blocks to swap; set it to 0.")
        if count > total:
            self.say(f"blocks_to_swap {count} is more than this transformer's {total} blocks: all {total} are "
                     "swapped.", "warning")
            count = total
        self.block_swap = BlockSwap.attach(self.denoiser, count, self.accelerator.device)
        self.denoiser.to(self.accelerator.device)
        self.say(self.block_swap.describe(self.config.gradient_checkpointing))

    def _cache_latents(self) -> None:
        """Every image through the VAE once, with only the VAE on the device."""
        vae = self.pipe.vae
        vae.to(self.accelerator.device)
        vae.enable_slicing()
        try:
            self.cache_images(vae, f"{self.config.base_model}|{self.family}", batch_size=1)
        finally:
            vae.to("cpu")
            free_memory()
        entries = self.latents.entries + (self.val_latents.entries if self.val_latents else [])
        if not all(torch.isfinite(e["mean"]).all() for e in entries):
            raise DatasetError("The VAE produced NaN/infinite latents; train with mixed_precision bf16 or no.")

    @torch.no_grad()
    def _cache_text(self) -> None:
        """Every caption through the text encoders once (only they on the device), then they leave it; when the
        captions change at every step (tag shuffling or dropout) the encoders stay on the device instead."""
        encoders = [getattr(self.pipe, n) for n in self.text_encoder_names]
        for encoder in encoders:
            encoder.to(self.text_device())
        if not self.caches_text:
            self.say("shuffle_tags/tag_dropout_rate: the captions change at every step, so the text encoders stay on "
                     "the GPU and encode each batch (T5-XXL needs about 9.5 GB in bf16).", "warning")
            return
        try:
            captions = self.caption_set()
            for start in range(0, len(captions), 8):
                chunk = captions[start:start + 8]
                out = self.encode_text(chunk)
                for j, caption in enumerate(chunk):
                    self.text_cache[caption] = {k: v[j].detach().to("cpu") for k, v in out.items()}
        finally:
            for encoder in encoders:
                encoder.to("cpu")
            free_memory()

    def text_device(self) -> torch.device:
        """Where the text encoders encode the captions: the GPU when they fit its free memory, else the CPU (slow,
        but once per caption before training; the step never needs them: Qwen-Image's Qwen2.5-VL-7B, FLUX.2 dev's
        Mistral Small 24B). Decided once, before they move."""
        if self._text_device is None:
            device = self.accelerator.device
            if device.type == "cuda":
                need = sum(p.numel() * p.element_size() for n in self.text_encoder_names
                           if getattr(self.pipe, n, None) is not None for p in getattr(self.pipe, n).parameters())
                free, _ = torch.cuda.mem_get_info(device)
                if need * TEXT_ROOM > free:
                    self.say(f"The text encoder ({need / 1e9:.1f} GB) does not fit the GPU's {free / 1e9:.1f} GB "
                             "free: the captions are encoded on the CPU (slower, once before training).", "warning")
                    device = torch.device("cpu")
            self._text_device = device
        return self._text_device

    def _add_adapters(self) -> None:
        from diffusers.training_utils import cast_training_params

        from ..networks import add_network, peft_config

        cfg = self.config
        add_network(self.denoiser, cfg.network_type, peft_config(cfg.network_type, cfg.lora_rank, cfg.alpha,
                                                                 self.lora_target_modules(), dropout=cfg.lora_dropout))
        if cfg.init_lora:
            from ..export.flux_lora import apply_init_lora

            apply_init_lora(self.denoiser, cfg.init_lora, cfg.lora_rank, cfg.alpha)
            self.say(f"Continuing from the LoRA {cfg.init_lora}.")
        cast_training_params([self.denoiser], dtype=torch.float32)

    def text_conditioning(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        if self.text_cache and all(c in self.text_cache for c in captions):
            return {k: stack_padded([self.text_cache[c][k] for c in captions]).to(self.accelerator.device)
                    for k in self.text_cache[captions[0]]}
        with torch.no_grad():  # the captions changed this step (tag shuffling or dropout): encoded now
            return self.encode_text(list(captions))

    # --- the step -----------------------------------------------------------------------------------
    def models(self) -> list[torch.nn.Module]:
        return [self.denoiser]

    def param_groups(self) -> list[dict[str, Any]]:
        params = [p for p in self.denoiser.parameters() if p.requires_grad]
        return [{"params": params, "lr": self.config.learning_rate}]

    def trained_denoiser(self) -> torch.nn.Module:
        """The transformer as the step calls it (through its DDP / mixed-precision wrapper once prepared; the
        validation, on the main process alone, calls it without the DDP wrapper)."""
        if self._validating:
            return self.denoiser
        return (self.prepared_models or [self.denoiser])[0]

    def sigmas_for(self, gens: Sequence[torch.Generator], latent_shape: Sequence[int]) -> torch.Tensor:
        cfg = self.config
        mu = None
        if cfg.timestep_sampling == "flux_shift":
            mu = shift_mu((latent_shape[-2] // 2) * (latent_shape[-1] // 2), self.pipe.scheduler.config)
        return sample_sigmas(cfg.timestep_sampling, gens, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
                             shift=cfg.discrete_flow_shift, mu=mu)

    def compute_loss(self, batch: Sequence[int]) -> torch.Tensor:
        cfg = self.config
        gens = batch.generators(cfg.seed) if isinstance(batch, Batch) else [self.generator] * len(batch)
        latents = self.normalize_latents(self.latents.sample(batch, gens))
        noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens])
        sigmas = self.sigmas_for(gens, latents.shape)
        per_sample = self.flow_loss(latents, noise, sigmas, self.step_captions(batch), self.step_masks(batch))
        return (per_sample * loss_weights(cfg.loss_weighting, sigmas).to(per_sample.device)).mean()

    def flow_loss(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, captions: Sequence[str],
                  masks: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample (masked) MSE of the predicted velocity against ``noise - latents`` at noise levels ``sigmas``."""
        acc = self.accelerator
        s = sigmas.view(-1, *([1] * (latents.ndim - 1)))
        noisy = (1.0 - s) * latents + s * noise
        target = flow_target(latents, noise)
        dev, dtype = acc.device, weight_dtype(acc)
        cond = self.text_conditioning(captions)
        with acc.autocast():
            pred = self.predict(noisy.to(dev, dtype), sigmas.to(dev), cond)
        return per_sample_mse(pred, target.to(dev), masks)

    def validation_loss(self, index: int) -> torch.Tensor:
        """One held-out image at noise levels spread evenly over (0, 1), with the latent mean and noise fixed by
        the seed and the image's place: the same number for the same weights, every time (unweighted)."""
        from .validation import VALIDATION_TIMESTEPS

        item, entry = self.val_items[index], self.val_latents.entries[index]
        k = VALIDATION_TIMESTEPS
        latents = self.normalize_latents(entry["mean"].float().unsqueeze(0)).expand(k, *entry["mean"].shape)
        gen = torch.Generator(device="cpu").manual_seed(sample_seed(self.config.seed, -1, index, 0))
        noise = torch.randn(latents.shape, generator=gen)
        sigmas = torch.tensor([(i + 0.5) / k for i in range(k)])
        masks = self.val_latents.masks([index] * k) if self.config.masked_loss else None
        self._validating = True
        try:
            return self.flow_loss(latents, noise, sigmas, [item.caption] * k, masks)
        finally:
            self._validating = False

    # --- weights ------------------------------------------------------------------------------------
    def peft_state(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.accelerator.unwrap_model(self.denoiser))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {f"{self.denoiser_name}.{k}": v for k, v in self.peft_state().items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft.utils import set_peft_model_state_dict

        prefix = self.denoiser_name + "."
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        result = set_peft_model_state_dict(self.accelerator.unwrap_model(self.denoiser), part)
        if getattr(result, "unexpected_keys", None):
            raise DatasetError(f"checkpoint does not match the model ({len(result.unexpected_keys)} unexpected keys)")

    def save_lora(self, folder: Path, name: str, step: int, epoch: int) -> list[Path]:
        return [self.write_lora(folder / f"{name}.safetensors", step, epoch)]

    def export(self, step: int, epoch: int) -> list[Path]:
        from ..data.tags import tag_frequency

        cfg = self.config
        path = self.write_lora(self.run.path / f"{cfg.output_name}.safetensors", step, epoch)
        if cfg.verify_export:
            self.bus.state("verifying export")
            report = self.verify(path)
            self.say(f"Export check passed: {report}")
            if getattr(report, "effect", None) is not None:
                self.warn_if_little_effect(report.effect, report.atol, "the test image")
        self.write_card(step, [path], tag_frequency({it.path: it.caption for it in self.items}, cfg.train_data_dir),
                        captions=[it.caption for it in self.items], num_images=len(self.items))
        return [path]

    # --- rendering ----------------------------------------------------------------------------------
    def inference_pipe(self):
        """The pipeline with the trained (unwrapped) transformer; the VAE on the device, the encoders where
        they wait (the pipeline encodes the prompt on their device)."""
        setattr(self.pipe, self.denoiser_name, self.accelerator.unwrap_model(self.denoiser))
        self.pipe.vae.to(self.accelerator.device)
        self.pipe.set_progress_bar_config(disable=True)
        return self.pipe

    def reference_renders(self, pipe, prompt: str, seed: int, held: bool = False) -> tuple[Any, Any]:
        """The trained pipeline's render and the same with the LoRA off, outside accelerate's autocast wrapper,
        with the LoRA rounded as the file stores it and a fresh pipeline loads it (``lora_as_stored``): a
        half-precision render moves by more than the check's tolerance when the LoRA weights are merely rounded.
        ``held``: the check renders in the dtypes training held (a quantized base, or the training pipeline)."""
        from ..export.verify import render

        denoiser = getattr(pipe, self.denoiser_name)
        loaded = self._loaded_lora_dtype() if held else ()
        with full_precision_forward(denoiser), lora_as_stored(denoiser, (torch.float16,) + loaded):
            expected = render(pipe, prompt, seed, VERIFY_STEPS, VERIFY_SIZE)
            denoiser.disable_adapters()
            try:
                base = render(pipe, prompt, seed, VERIFY_STEPS, VERIFY_SIZE)
            finally:
                denoiser.enable_adapters()
        return expected, base

    def _loaded_lora_dtype(self) -> tuple[torch.dtype, ...]:
        """The dtype diffusers gives a LoRA it loads into this transformer as training held it (PEFT matches a
        layer's floating weight dtype: bf16, or float8 for an fp8 base; a 4-bit layer the compute dtype)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        layer = next(m for m in self.denoiser.modules() if isinstance(m, BaseTunerLayer))
        dtype = layer.get_base_layer().weight.dtype
        return (dtype if dtype.is_floating_point else self.held_dtypes.get(self.denoiser_name, torch.float32),)

    @torch.no_grad()
    def render_sample(self, step: int) -> Path | None:
        pipe = self.inference_pipe()
        gen = torch.Generator(device="cpu").manual_seed(self.config.seed)
        with self.accelerator.autocast():
            image = pipe(prompt=self.config.sample_prompt, height=self.resolution, width=self.resolution, generator=gen,
                         max_sequence_length=self.sequence_length(), **self.render_kwargs()).images[0]
        pipe.vae.to("cpu")
        return self.run.save_sample(step, image)
