"""FLUX.1 and Chroma on the flow-matching trainer: what these two families add to ``FlowMatchingTrainer``.

- **Text** (encoded once, then the encoders leave the GPU): FLUX.1 gets CLIP-L's pooled embedding and T5-XXL's
  sequence (``max_sequence_length`` tokens, padded as the pipeline pads), both through the pipeline's own
  ``encode_prompt``; Chroma gets T5 only, with its attention mask (padding masked except the first pad token,
  as ``ChromaPipeline`` does).
- **Latents**: 16 channels with the VAE's shift and scaling factors (cached), packed 2x2 into tokens and
  unpacked with the pipeline's ``_pack_latents`` / ``_unpack_latents``; image ids from
  ``_prepare_latent_image_ids`` at half the latent size; text ids zero. Buckets are multiples of 64 px, so
  every latent side is even.
- **Guidance**: a guidance-distilled model (FLUX.1-dev, Krea: ``guidance_embeds``) gets ``guidance_scale``
  (1.0 by default, as sd-scripts and ai-toolkit train it); schnell and Chroma get none.
- **LoRA layers** (``lora_targets``): ``attention`` = q, k, v and out of the image and text streams
  (``to_q, to_k, to_v, to_out.0, add_q_proj, add_k_proj, add_v_proj, to_add_out``; a single block's
  ``attn.to_q/k/v``); ``all_linear`` adds the feed-forward layers and the single blocks' ``proj_mlp`` and
  ``proj_out``. ``target_modules`` (layer names) overrides the preset; ``train_double_block_indices`` /
  ``train_single_block_indices`` keep only some blocks (``all``, ``none``, ``0-7,10``), as in sd-scripts.
- **Precision**: FLUX overflows in fp16, so ``mixed_precision: fp16`` trains in bf16 (said once).
- **Export**: ``export/flux_lora.py`` (``transformer.*`` keys with alphas, ``ss_*`` metadata); the export check
  reloads the file into a fresh pipeline (quantized as the run's base was) and counts the layers placed.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import TrainConfig, block_indices
from ..errors import ConfigError
from ..families import FLUX_ALL_LINEAR, FLUX_ATTENTION, get_family
from ..models.flux_loading import render_defaults
from .events import EventBus
from .flow_matching import VERIFY_SIZE, VERIFY_STEPS, FlowMatchingTrainer
from .run_folder import RunFolder
from .runtime import full_precision_forward, weight_dtype

ATTENTION_TARGETS, ALL_LINEAR_TARGETS = FLUX_ATTENTION, FLUX_ALL_LINEAR  # lora_targets: attention, all_linear
# the transformer's lists of blocks, each with the config key that keeps only some of them
FLUX_BLOCKS = {"transformer_blocks": "train_double_block_indices",
               "single_transformer_blocks": "train_single_block_indices"}


def target_modules(transformer: torch.nn.Module, config: TrainConfig, attention: Sequence[str] = ATTENTION_TARGETS,
                   all_linear: Sequence[str] = ALL_LINEAR_TARGETS, blocks: dict[str, str] | None = None) -> list[str]:
    """Full paths of the transformer's Linear layers that get a LoRA (preset or target_modules, block filters);
    ``attention`` / ``all_linear``: the family's presets, ``blocks``: its block lists (FLUX's by default)."""
    blocks = blocks or FLUX_BLOCKS
    block = re.compile(rf"^({'|'.join(map(re.escape, blocks))})\.(\d+)\.(.+)$")
    keep = {name: block_indices(getattr(config, key), key, len(getattr(transformer, name)))
            for name, key in blocks.items()}
    wanted = tuple(config.target_modules or (attention if config.lora_targets == "attention" else all_linear))
    found, used, layer_names = [], set(), set()
    for name, module in transformer.named_modules():
        match = block.match(name)
        if not match or not isinstance(module, torch.nn.Linear):
            continue
        kind, index, rest = match.group(1), int(match.group(2)), match.group(3)
        layer_names.add(rest)
        hits = [t for t in wanted if rest == t or rest.endswith("." + t)]
        if hits and (keep[kind] is None or index in keep[kind]):
            found.append(name)
            used.update(hits)
    unknown = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in layer_names)]
    if config.target_modules and unknown:
        raise ConfigError("target_modules", f"'{unknown[0]}' matches no layer of this transformer's blocks; its "
                          f"layers are: {', '.join(sorted(layer_names))}.")
    if not found:
        raise ConfigError("train_double_block_indices", "no layer gets a LoRA: the block filters leave out every block "
                          "(set train_double_block_indices or train_single_block_indices to all).")
    return found


class FluxTrainer(FlowMatchingTrainer):
    text_encoder_names = ("text_encoder", "text_encoder_2")
    transformer_loader = "lora_studio.models.flux_loading:load_transformer"  # (base_model, family, **kwargs)
    file_prefix = "transformer."  # of the keys in the LoRA file (export/flux_lora.py)
    network_module = "networks.lora_flux"  # ss_network_module: sd-scripts' module for the family

    def __init__(self, config: TrainConfig, run: RunFolder, bus: EventBus, family: str = "flux"):
        # FLUX's activations overflow in fp16 (the registry's half_dtype says bfloat16)
        self._fp16_replaced = config.mixed_precision == "fp16" and get_family(family).half_dtype == "bfloat16"
        if self._fp16_replaced:
            config = config.replace(mixed_precision="bf16")
        super().__init__(config, run, bus, family)
        self._targets: list[str] | None = None

    # --- loading ------------------------------------------------------------------------------------
    def load_pipeline(self, dtype: torch.dtype):
        if self._fp16_replaced and dtype == torch.bfloat16:
            self.say(f"{get_family(self.family).name} overflows in fp16: training in bf16 instead (mixed_precision "
                     "fp16 is replaced).", "warning")
        cfg = self.config
        return get_family(self.family).hook("pipeline_loader")(
            cfg.base_model, self.family, torch_dtype=dtype, without_transformer=True,
            single_file_config=cfg.single_file_config, report=self.say)

    def load_denoiser(self, dtype: torch.dtype, device: torch.device | None = None) -> torch.nn.Module:
        """The transformer, quantized as ``self.quantization`` says, on ``device`` (the run's by default)."""
        from ..families import _load
        from .quantize import load_with_quantization, quantize_in_place

        load_transformer = _load(self.transformer_loader)

        cfg, device = self.config, device or self.accelerator.device

        def load(**kwargs):
            return load_transformer(cfg.base_model, self.family, single_file_config=cfg.single_file_config,
                                    **{"torch_dtype": dtype, **kwargs})

        if self.quantization == "nf4" and not Path(cfg.base_model).expanduser().is_file():
            model = load_with_quantization(load, "nf4", dtype, device)
        else:
            model = load()
            quantize_in_place(model, self.quantization, dtype)
        return model.to(device)

    def lora_target_modules(self) -> list[str]:
        if self._targets is None:
            self._targets = target_modules(self.denoiser, self.config)
        return self._targets

    # --- text ---------------------------------------------------------------------------------------
    def encode_text(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        self._warn_long_captions(captions)
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=list(captions), prompt_2=None,
                                                    device=self.text_device(),
                                                    max_sequence_length=self.sequence_length())
        return {"prompt_embeds": embeds, "pooled": pooled}

    def _warn_long_captions(self, captions: Sequence[str], encoder: str = "T5") -> None:
        tokenizer = self.pipe.tokenizer_2 if hasattr(self.pipe, "tokenizer_2") else self.pipe.tokenizer
        limit = self.sequence_length()
        long = [c for c in captions if len(tokenizer(c).input_ids) > limit]
        if long:
            self.say(f"{len(long)} caption(s) are longer than max_sequence_length {limit} {encoder} tokens and are "
                     f"cut, e.g. '{long[0][:60]}...'. Shorten them or raise max_sequence_length (at most 512).",
                     "warning")

    # --- the step -----------------------------------------------------------------------------------
    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        from diffusers import FluxPipeline

        b, c, h, w = noisy.shape
        dev, dtype = noisy.device, noisy.dtype
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        embeds = cond["prompt_embeds"].to(dtype)
        kwargs = self.model_kwargs(cond, b, packed.shape[1], dtype)
        out = self.trained_denoiser()(
            hidden_states=packed, timestep=sigmas.to(dtype), encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=dev, dtype=dtype),
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, dev, dtype), return_dict=False,
            **kwargs)[0]
        return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)  # (h, w) latents: any consistent scale factor

    def model_kwargs(self, cond: dict[str, torch.Tensor], batch: int, image_tokens: int,
                     dtype: torch.dtype) -> dict[str, Any]:
        """FLUX.1: the pooled CLIP embedding, and the guidance input of a guidance-distilled model."""
        guided = self.accelerator.unwrap_model(self.denoiser).config.guidance_embeds
        guidance = torch.full((batch,), self.config.guidance_scale, device=cond["pooled"].device) if guided else None
        return {"pooled_projections": cond["pooled"].to(dtype), "guidance": guidance}

    def sequence_length(self) -> int:
        """``max_sequence_length``, at most the long-prompt tokenizer's ``model_max_length`` (``prompt_length``)."""
        from ..models.flux_loading import prompt_length

        return prompt_length(self.pipe, self.config.max_sequence_length)

    # --- files and checks ---------------------------------------------------------------------------
    def render_kwargs(self) -> dict[str, Any]:
        return render_defaults(self.family, self.accelerator.unwrap_model(self.denoiser).config)

    def metadata(self, step: int, epoch: int) -> dict[str, str]:
        from ..data.tags import tag_frequency
        from ..export.metadata import build_kohya_metadata

        cfg = self.config
        guided = getattr(self.accelerator.unwrap_model(self.denoiser).config, "guidance_embeds", True)
        extra = {"ss_network_module": self.network_module, "ss_guidance_scale": cfg.guidance_scale,
                 "ss_timestep_sampling": cfg.timestep_sampling, "ss_max_sequence_length": self.sequence_length(),
                 "ss_base_quantization": self.quantization}
        if self.family == "flux" and not guided:
            extra["modelspec.architecture"] = "flux-1-schnell/lora"
        if cfg.network_type != "lora":
            from ..networks import kohya_network_metadata

            extra.update(kohya_network_metadata(cfg))
        return build_kohya_metadata(
            output_name=cfg.output_name, family=self.family, rank=cfg.lora_rank, alpha=cfg.alpha,
            resolution=self.resolution, num_train_images=len(self.items),
            tag_frequency=tag_frequency({it.path: it.caption for it in self.items}, cfg.train_data_dir),
            base_model_name=Path(cfg.base_model).name or cfg.base_model, training_started_at=self.started_at,
            steps=step, epoch=epoch, extra=extra)

    def check_placement(self, state: dict[str, torch.Tensor]) -> int:
        """Every LoRA layer is a layer of the transformer and in ComfyUI's key map of the family (FLUX here)."""
        from ..export.flux_lora import check_placement

        return check_placement(state, self.accelerator.unwrap_model(self.denoiser))

    def write_lora(self, path: Path, step: int, epoch: int) -> Path:
        from ..export.flux_lora import save_flux_lora

        state = self.peft_state()
        self.check_placement(state)
        return save_flux_lora(path, state, rank=self.config.lora_rank, alpha=self.config.alpha,
                              metadata=self.metadata(step, epoch), prefix=self.file_prefix)

    @torch.no_grad()
    def verify(self, lora_file: Path):
        """Reload the file into a fresh pipeline (same quantized base): strength 1 must give the trained model's
        image, 0 the base's, and every layer must be placed. When a second pipeline in float32 does not fit (the
        real 12B model: about 48 GB for the transformer alone), the file is loaded as a second adapter into the
        trained pipeline instead, on the same frozen weights, in the dtype training held."""
        from ..export.verify import check_export, check_reload

        cfg, device = self.config, self.accelerator.device
        pipe = self.inference_pipe()
        checks = dict(expected_modules=len(self.lora_target_modules()), denoiser=self.denoiser_name,
                      prompt=self.items[0].caption, seed=cfg.seed, steps=VERIFY_STEPS, size=VERIFY_SIZE)
        if not self.fresh_pipeline_fits(pipe):
            self.say("Checking the export on the training pipeline (a second one in float32 does not fit in memory).")
            expected, base = self.reference_renders(pipe, checks["prompt"], cfg.seed, held=True)
            denoiser = getattr(pipe, self.denoiser_name)
            denoiser.disable_adapters()
            with warnings.catch_warnings():  # peft's notes on the second adapter, which is meant here
                warnings.filterwarnings("ignore", "Already found a `peft_config`", UserWarning)
                warnings.filterwarnings("ignore", "Adapter verify was active", UserWarning)
                try:
                    with full_precision_forward(denoiser):  # as the reference renders: without accelerate's wrapper
                        return check_reload(pipe, lora_file, expected_images=expected, base_images=base,
                                            family=self.family, **checks)
                finally:
                    pipe.delete_adapters("verify")
                    denoiser.set_adapters(["default"])
                    denoiser.enable_adapters()
        self._check_dtypes(pipe)
        expected, base = self.reference_renders(pipe, checks["prompt"], cfg.seed, held=self.quantization != "none")
        return check_export(cfg.base_model, self.family, lora_file, expected_images=expected, base_images=base,
                            device=device, fresh_pipeline=self._fresh_pipeline, **checks)

    def fresh_pipeline_fits(self, pipe) -> bool:
        """Room for a second pipeline in float32 (plus a quarter) on the run's device: GPU memory, or free RAM. A run
        that swaps blocks has no room for a second transformer on its GPU."""
        if self.block_swap and self.accelerator.device.type == "cuda":
            return False
        fp32 = 4 * sum(p.numel() for m in pipe.components.values() if isinstance(m, torch.nn.Module)
                       for p in m.parameters())
        if self.accelerator.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.accelerator.device)
        else:
            import psutil

            free = psutil.virtual_memory().available
        return free > 1.25 * fp32

    def _fresh_pipeline(self):
        """The base model loaded anew, rounded as training held it; a quantized transformer quantized again the
        same way (deterministic: the same stored weights)."""
        from ..export.verify import load_fresh_pipeline
        from ..models.load_lock import model_loading

        cfg, device = self.config, self.accelerator.device
        if self.quantization == "none":
            return load_fresh_pipeline(cfg.base_model, self.family, device=device, held_dtypes=self.held_dtypes,
                                       single_file_config=cfg.single_file_config)
        with model_loading(cfg.base_model):
            fresh = get_family(self.family).hook("pipeline_loader")(
                cfg.base_model, self.family, single_file_config=cfg.single_file_config,
                transformer=self.load_denoiser(weight_dtype(self.accelerator), device))
        self._check_dtypes(fresh)
        fresh.set_progress_bar_config(disable=True)
        return fresh

    def _check_dtypes(self, pipe) -> None:
        """The dtypes the export check renders in, on the run's device: float32 everywhere (a half-precision
        base was already rounded as training held it); with a quantized base, every part as training held it
        (its layers compute in that dtype, so float32 inputs would not fit them)."""
        for name, module in pipe.components.items():
            if not isinstance(module, torch.nn.Module):
                continue
            if self.quantization == "none":
                module.to(self.accelerator.device, torch.float32)
            elif name == self.denoiser_name:
                module.to(self.accelerator.device)
            else:
                module.to(self.accelerator.device, self.held_dtypes.get(name, torch.float32))


class ChromaTrainer(FluxTrainer):
    """Chroma: T5 only (with its attention mask), no pooled embedding, no guidance input."""

    text_encoder_names = ("text_encoder",)

    def __init__(self, config: TrainConfig, run: RunFolder, bus: EventBus, family: str = "chroma"):
        super().__init__(config, run, bus, family)

    def encode_text(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        self._warn_long_captions(captions)
        embeds, _, mask, *_ = self.pipe.encode_prompt(prompt=list(captions), device=self.text_device(),
                                                      do_classifier_free_guidance=False,
                                                      max_sequence_length=self.sequence_length())
        return {"prompt_embeds": embeds, "attention_mask": mask}

    def model_kwargs(self, cond: dict[str, torch.Tensor], batch: int, image_tokens: int,
                     dtype: torch.dtype) -> dict[str, Any]:
        mask = self.pipe._prepare_attention_mask(batch_size=batch, sequence_length=image_tokens, dtype=dtype,
                                                 attention_mask=cond["attention_mask"])
        return {"attention_mask": mask}
