"""What every image trainer shares (``DiffusionTrainer`` for SD/SDXL, ``FlowMatchingTrainer`` for FLUX.1/Chroma):
its resolution (the config's, else the family's default), the pipeline, the training items and their preflight
report, the latent and text caches, and this process's batches of an epoch."""

from __future__ import annotations

import torch

from ..config import TrainConfig
from ..data.train_set import Batch, Preflight, TrainItem, epoch_batches
from .events import EventBus
from .latent_cache import LatentCache
from .loop import Trainer
from .run_folder import RunFolder


class ImageTrainer(Trainer):
    def __init__(self, config: TrainConfig, run: RunFolder, bus: EventBus, family: str):
        super().__init__(config, run, bus, family)
        self.resolution = config.resolution_for(family)
        self.pipe = None
        self.items: list[TrainItem] = []
        self.report: Preflight | None = None
        self.latents: LatentCache | None = None
        self.text_cache: dict[str, dict[str, torch.Tensor]] = {}  # caption -> its cached text conditioning
        self.started_at = 0.0

    def batches(self, epoch: int) -> list[Batch]:
        acc = self.accelerator
        return epoch_batches(self.items, self.config.batch_size, self.config.seed, epoch,
                             acc.process_index, acc.num_processes)

    def cleanup(self) -> None:
        self.latents = None
        self.text_cache = {}
