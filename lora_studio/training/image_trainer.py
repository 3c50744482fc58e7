"""What every image trainer shares (``DiffusionTrainer`` for SD/SDXL, ``FlowMatchingTrainer`` for FLUX.1/Chroma):
its resolution (the config's, else the family's default), the pipeline, the training items and their preflight
report, the held-out validation images (``validation_split`` / ``validation_dir``) and the loss masks
(``masked_loss``), the latent and text caches, this process's batches of an epoch, and each step's captions
after caption dropout, tag shuffling and tag dropout."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

import torch

from ..config import TrainConfig
from ..data.train_set import Batch, Preflight, TrainItem, epoch_batches, preflight_run, sample_seed
from .events import EventBus
from .latent_cache import LatentCache, cache_for_run
from .loop import Trainer
from .run_folder import RunFolder

CAPTION_SEED = 7919  # caption randomness is its own stream: turning it on leaves the noise of a run as it was


class ImageTrainer(Trainer):
    def __init__(self, config: TrainConfig, run: RunFolder, bus: EventBus, family: str):
        super().__init__(config, run, bus, family)
        self.resolution = config.resolution_for(family)
        self.pipe = None
        self.items: list[TrainItem] = []
        self.val_items: list[TrainItem] = []
        self.report: Preflight | None = None
        self.latents: LatentCache | None = None
        self.val_latents: LatentCache | None = None
        self.text_cache: dict[str, dict[str, torch.Tensor]] = {}  # caption -> its cached text conditioning
        self._validating = False  # the validation loss runs on the main process alone, without the DDP wrapper
        self.started_at = 0.0

    # --- the images ---------------------------------------------------------------------------------
    def read_images(self) -> None:
        """The training images (preflight report in the log), the validation images held out, the loss masks."""
        from ..data.masks import attach_masks
        from ..data.validation_set import image_validation_set

        cfg = self.config
        self.report = preflight_run(cfg, self.resolution, self.say)
        self.items, self.val_items, note = image_validation_set(list(self.report.items), self.report.folder, cfg,
                                                                self.resolution)
        if note:
            self.say(note)
        if cfg.masked_loss:
            files, alpha = attach_masks(self.items + self.val_items, self.report.folder)
            if cfg.validation_dir:
                attach_masks(self.val_items, Path(cfg.validation_dir))
            total = len(self.items) + len(self.val_items)
            self.say(f"masked_loss: {files + alpha} of {total} images have a mask ({files} in masks/, {alpha} from "
                     "their alpha channel); the others train on every pixel.",
                     "info" if files + alpha else "warning")

    def cache_images(self, vae, vae_id: str, **kwargs) -> None:
        """The latents of the training images and of the validation images (``latent_cache.cache_for_run``)."""
        self.latents, self.items = cache_for_run(self, vae, vae_id, **kwargs)
        if self.val_items:
            self.val_latents, self.val_items = cache_for_run(self, vae, vae_id, items=self.val_items,
                                                             stage="caching validation latents", required=False,
                                                             **kwargs)

    def caption_set(self) -> list[str]:
        """Every caption the cached text conditioning needs: training and validation, and "" for caption dropout."""
        return sorted({it.caption for it in self.items + self.val_items}
                      | ({""} if self.config.caption_dropout_rate else set()))

    @property
    def caches_text(self) -> bool:
        """Whether the text conditioning is encoded once: the encoders are frozen and the text never varies."""
        from ..data.caption_aug import changes_tags

        cfg = self.config
        return not cfg.train_text_encoder and not changes_tags(cfg.shuffle_tags, cfg.tag_dropout_rate)

    # --- the steps ----------------------------------------------------------------------------------
    def batches(self, epoch: int) -> list[Batch]:
        acc = self.accelerator
        return epoch_batches(self.items, self.config.batch_size, self.config.seed, epoch,
                             acc.process_index, acc.num_processes)

    def step_captions(self, batch: Sequence[int]) -> list[str]:
        """The captions of this step's samples, after caption dropout, tag shuffling and tag dropout (each
        sample's own random draw: repeatable, and independent of the noise)."""
        from ..data.caption_aug import augment_caption, changes_captions

        cfg = self.config
        captions = [self.items[i].caption for i in batch]
        if not changes_captions(cfg.caption_dropout_rate, cfg.shuffle_tags, cfg.tag_dropout_rate):
            return captions
        if isinstance(batch, Batch):
            seeds = [sample_seed(cfg.seed + CAPTION_SEED, *pos) for pos in batch.positions()]
        else:
            seeds = [int(torch.randint(0, 2**62, (1,), generator=self.generator)) for _ in batch]
        return [augment_caption(c, random.Random(seed), dropout=cfg.caption_dropout_rate, shuffle=cfg.shuffle_tags,
                                keep_tokens=cfg.keep_tokens, tag_dropout=cfg.tag_dropout_rate)
                for c, seed in zip(captions, seeds)]

    def step_masks(self, batch: Sequence[int]) -> torch.Tensor | None:
        """This step's loss weights at the latent grid (``masked_loss``), or None."""
        return self.latents.masks(batch) if self.config.masked_loss else None

    def validation_batches(self) -> list[int]:
        return list(range(len(self.val_items)))

    def cleanup(self) -> None:
        self.latents = None
        self.val_latents = None
        self.text_cache = {}
