"""The image training set: which images train, with which caption, in which bucket, in which order.

``preflight`` looks at the folder before any model is loaded and reports images found, images with
captions, and every skipped file with the reason. It refuses to start with zero usable images or zero
captions: a run without captions that "succeeds" is the most common silent failure of other trainers.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image

from ..errors import DatasetError
from .buckets import make_buckets, pick_bucket
from .captions import load_captions, relative_name
from .images import list_images

log = logging.getLogger(__name__)


@dataclass
class TrainItem:
    path: Path
    caption: str
    size: tuple[int, int]  # original (width, height) after EXIF rotation
    bucket: tuple[int, int]  # training (width, height)
    repeats: int = 1


@dataclass
class Preflight:
    folder: Path
    found: int = 0
    captioned: int = 0
    items: list[TrainItem] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (f"{self.found} images found in {self.folder}, {self.captioned} with captions, "
                f"{len(self.items)} will train")
        if self.skipped:
            text += f", {len(self.skipped)} skipped"
        return text + "."

    def lines(self) -> list[str]:
        out = [self.summary()]
        out += [f"  skipped {name}: {reason}" for name, reason in self.skipped[:50]]
        if len(self.skipped) > 50:
            out.append(f"  ... and {len(self.skipped) - 50} more skipped")
        out += [f"  warning: {w}" for w in self.warnings]
        return out


def _oriented_size(path: Path) -> tuple[int, int]:
    """Width and height after EXIF rotation, reading only the header."""
    with Image.open(path) as img:
        w, h = img.size
        try:
            orientation = img.getexif().get(0x0112, 1)
        except Exception:
            orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _repeats(path: Path, root: Path) -> int:
    from .tags import repeats_for

    return repeats_for(path, root)


def preflight(train_data_dir: str | Path, resolution: int, *, metadata_path: str | None = None,
              caption_extension: str = ".txt", enable_bucket: bool = True) -> Preflight:
    """Scan the folder and match captions. Raises DatasetError when nothing can train."""
    folder = Path(train_data_dir).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"The training folder '{folder}' does not exist (train_data_dir). "
                           "Give the folder that holds your images.")
    report = Preflight(folder=folder)
    images = list_images(folder)
    report.found = len(images)
    if not images:
        raise DatasetError(f"No images found in '{folder}'. Supported: jpg, jpeg, png, webp, bmp, tiff, gif.")
    captions = load_captions(folder, images, metadata_path=metadata_path, caption_extension=caption_extension)
    report.captioned = sum(1 for p in images if captions.get(p, "").strip())
    if report.captioned == 0:
        where = metadata_path or f"{folder / 'metadata.csv'} or {caption_extension} files next to the images"
        raise DatasetError(f"None of the {len(images)} images has a caption (looked in {where}). Caption them "
                           "first (Captioning tab, or python -m lora_studio caption); training without "
                           "captions gives a useless LoRA.")
    buckets = make_buckets(resolution) if enable_bucket else [(resolution, resolution)]
    small = 0
    for path in images:
        name = relative_name(path, folder)
        caption = captions.get(path, "").strip()
        if not caption:
            report.skipped.append((name, "no caption"))
            continue
        try:
            size = _oriented_size(path)
        except Exception as exc:
            report.skipped.append((name, f"unreadable ({exc.__class__.__name__})"))
            continue
        bucket = pick_bucket(*size, buckets)
        if size[0] < bucket[0] or size[1] < bucket[1]:
            small += 1
        report.items.append(TrainItem(path, caption, size, bucket, _repeats(path, folder)))
    if small:
        report.warnings.append(f"{small} image(s) are smaller than the training size {resolution}px and will be "
                               "upscaled, which looks soft; use larger images or a lower resolution.")
    if not report.items:
        raise DatasetError(f"No usable images in '{folder}': " + "; ".join(f"{n}: {r}" for n, r in report.skipped[:5]))
    return report


def preflight_run(config, resolution: int, say) -> Preflight:
    """``preflight`` of a run's ``train_data_dir`` with its caption settings; each report line said (skips and
    warnings as warnings)."""
    report = preflight(config.train_data_dir, resolution, metadata_path=config.metadata_path,
                       caption_extension=config.caption_extension, enable_bucket=config.enable_bucket)
    for line in report.lines():
        say(line, "warning" if line.lstrip().startswith(("skipped", "warning")) else "info")
    return report


class Batch(list):
    """Indices of ``items`` for one micro-batch, and where it sits in the epoch.

    ``number`` is the global batch (one optimizer micro-step of all processes together) and ``offset`` the
    position of this micro-batch's first sample inside it, so sample ``k`` of the batch is sample
    ``offset + k`` of global batch ``number`` whichever process trains it. Trainers key per-sample
    randomness on ``(seed, epoch, number, offset + k)``: the same samples then get the same noise with
    batch 2 on one process as with batch 1 on each of two processes.
    """

    def __init__(self, indices: Sequence[int], epoch: int = 0, number: int = 0, offset: int = 0):
        super().__init__(indices)
        self.epoch, self.number, self.offset = epoch, number, offset

    def positions(self) -> list[tuple[int, int, int]]:
        """``(epoch, global batch, position in it)`` of each sample."""
        return [(self.epoch, self.number, self.offset + k) for k in range(len(self))]

    def generators(self, seed: int) -> list:
        """One CPU ``torch.Generator`` per sample, seeded by ``(seed, epoch, global batch, position)``."""
        import torch

        return [torch.Generator(device="cpu").manual_seed(sample_seed(seed, *pos)) for pos in self.positions()]


def sample_seed(seed: int, epoch: int, number: int, position: int) -> int:
    """A 63-bit seed for one sample of one epoch (stable across processes, runs and platforms)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{number}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def epoch_batches(items: Sequence[TrainItem], batch_size: int, seed: int, epoch: int,
                  process_index: int = 0, num_processes: int = 1) -> list[Batch]:
    """Same-bucket batches of ``items`` indices, shuffled by (seed, epoch), this process's share.

    The epoch is first cut into global batches of ``batch_size x num_processes`` samples of one bucket
    and shuffled; each process then takes its ``batch_size`` slice of every global batch. So every
    process gets the same number of equally sized batches (all processes step together), and what one
    optimizer step sees depends only on the effective batch: batch 2 on one process and batch 1 on two
    processes train on the same samples in the same order. With one process this is the plain
    shuffled-buckets order. Under several processes a bucket whose image count does not divide by the
    number of processes is filled up by repeating its first (shuffled) images.
    """
    rng = random.Random(seed * 1000003 + epoch)
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for idx, item in enumerate(items):
        by_bucket.setdefault(item.bucket, []).extend([idx] * max(item.repeats, 1))
    world = max(num_processes, 1)
    global_size = batch_size * world
    groups: list[list[int]] = []
    for bucket in sorted(by_bucket):
        idxs = by_bucket[bucket]
        rng.shuffle(idxs)
        if len(idxs) % world:
            idxs = idxs + (idxs * world)[:world - len(idxs) % world]
        groups += [idxs[i:i + global_size] for i in range(0, len(idxs), global_size)]
    rng.shuffle(groups)
    out = []
    for number, group in enumerate(groups):
        share = len(group) // world  # batch_size, or less for a bucket's last global batch
        offset = process_index * share
        out.append(Batch(group[offset:offset + share], epoch, number, offset))
    return out
