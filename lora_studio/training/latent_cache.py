"""Encode every training image with the VAE once, and keep the result (memory or disk).

Without the cache the VAE encodes each image at every step, which costs more time than the LoRA step
itself for small batches. The cache holds the latent distribution's mean and standard deviation, so each
step still draws a fresh sample (as an uncached run would). On disk the files are keyed by the image's
path, size, modification time, bucket and VAE, so a second run on the same data skips the encoding.

Under several processes (``encode_latents_shared``) each process encodes every N-th image, so the VAE
work is split, not repeated; the processes then exchange their latents (memory) or read each other's
files after a barrier (disk), and every process ends with the same complete cache.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..data.buckets import resize_to_bucket
from ..data.images import load_image_rgb
from ..data.masks import ALPHA, bucket_mask, latent_mask
from ..data.train_set import TrainItem
from .events import Progress

log = logging.getLogger(__name__)


def image_tensor(item: TrainItem) -> tuple[torch.Tensor, tuple[int, int]]:
    """The image resized and cropped to its bucket, as a (3, H, W) tensor in [-1, 1], and the crop offset."""
    img, crop = resize_to_bucket(load_image_rgb(item.path), item.bucket)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), crop


def _key(item: TrainItem, vae_id: str) -> str:
    st = item.path.stat()
    raw = f"{item.path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{item.bucket}|{vae_id}"
    if item.mask is not None:  # masked_loss: the mask (and its file's version) is part of the entry
        mask_file = item.path if item.mask == ALPHA else Path(item.mask)
        raw += f"|mask:{item.mask}|{mask_file.stat().st_mtime_ns}"
    return hashlib.sha1(raw.encode()).hexdigest()


class LatentCache:
    """mean/std latents per item (scaled by the VAE scaling factor), plus the crop offset for SDXL."""

    def __init__(self, entries: list[dict[str, torch.Tensor]]):
        self.entries = entries

    def sample(self, indices: Sequence[int], generator: torch.Generator | Sequence[torch.Generator]) -> torch.Tensor:
        """Latents drawn from the cached distributions: one generator for the batch, or one per sample."""
        mean = torch.stack([self.entries[i]["mean"] for i in indices]).float()
        std = torch.stack([self.entries[i]["std"] for i in indices]).float()
        if isinstance(generator, torch.Generator):
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        else:
            noise = torch.stack([torch.randn(mean.shape[1:], generator=g, dtype=mean.dtype) for g in generator])
        return mean + std * noise

    def crops(self, indices: Sequence[int]) -> list[tuple[int, int]]:
        return [tuple(self.entries[i]["crop"].tolist()) for i in indices]

    def masks(self, indices: Sequence[int]) -> torch.Tensor | None:
        """(batch, 1, h, w) loss weights at the latent grid (ones for an image without a mask); None when none of
        these images has a mask."""
        if not any("mask" in self.entries[i] for i in indices):
            return None
        return torch.stack([self.entries[i].get("mask", torch.ones_like(self.entries[i]["mean"][:1]))
                            for i in indices]).float()


@torch.no_grad()
def encode_latents(vae, items: Sequence[TrainItem], *, device: torch.device, dtype: torch.dtype,
                   disk_dir: Path | None = None, vae_id: str = "", batch_size: int = 4,
                   progress: Callable[[int, int], None] | None = None,
                   on_error: Callable[[TrainItem, Exception], None] | None = None) -> tuple[LatentCache, list[int]]:
    """Encode ``items``; returns the cache and the indices of the items that failed (reported, skipped)."""
    scaling = float(getattr(vae.config, "scaling_factor", None) or 1.0)  # FLUX.2's VAE has none (batch norm)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    entries: list[dict[str, torch.Tensor] | None] = [None] * len(items)
    todo: list[int] = []
    for i, item in enumerate(items):
        cached = disk_dir / f"{_key(item, vae_id)}.pt" if disk_dir else None
        if cached is not None and cached.is_file():
            try:
                entries[i] = torch.load(cached, map_location="cpu")
                continue
            except Exception:  # a broken cache file is re-encoded
                pass
        todo.append(i)
    failed: list[int] = []
    done = len(items) - len(todo)
    # Images of one bucket have the same size, so they can be encoded together.
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i in todo:
        by_bucket.setdefault(items[i].bucket, []).append(i)
    for group in by_bucket.values():
        for start in range(0, len(group), batch_size):
            chunk, pixels, crops = [], [], []
            for i in group[start:start + batch_size]:
                try:
                    px, crop = image_tensor(items[i])
                except Exception as exc:
                    failed.append(i)
                    if on_error:
                        on_error(items[i], exc)
                    continue
                chunk.append(i)
                pixels.append(px)
                crops.append(crop)
            if chunk:
                dist = vae.encode(torch.stack(pixels).to(device, dtype)).latent_dist
                mean = ((dist.mean - shift) * scaling).float().cpu()
                std = (dist.std * scaling).float().cpu()
                for j, i in enumerate(chunk):
                    entry = {"mean": mean[j].clone(), "std": std[j].clone(), "crop": torch.tensor(crops[j])}
                    item = items[i]
                    if item.mask is not None:
                        pixels_mask = bucket_mask(item.path, item.mask, item.size, item.bucket)
                        entry["mask"] = latent_mask(pixels_mask, tuple(mean.shape[-2:]))
                    entries[i] = entry
                    if disk_dir is not None:
                        disk_dir.mkdir(parents=True, exist_ok=True)
                        torch.save(entry, disk_dir / f"{_key(items[i], vae_id)}.pt")
            done += len(group[start:start + batch_size])
            if progress:
                progress(done, len(items))
    return LatentCache([e for e in entries if e is not None]), sorted(failed)


def encode_latents_shared(vae, items: Sequence[TrainItem], accelerator, *, disk_dir: Path | None = None,
                          progress: Callable[[int, int], None] | None = None,
                          on_error: Callable[[TrainItem, Exception], None] | None = None,
                          **kwargs) -> tuple[LatentCache, list[int]]:
    """``encode_latents`` with the work split over the run's processes; every process gets the whole cache.

    Process ``r`` of ``N`` encodes items ``r, r+N, r+2N ...``. With a disk cache the processes meet at a
    barrier and then load all files (nothing is encoded twice); in memory they exchange their latents
    with one ``gather_object``. Unreadable images are reported by every process (only the main one logs).
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    if world <= 1:
        return encode_latents(vae, items, disk_dir=disk_dir, progress=progress, on_error=on_error, **kwargs)
    from accelerate.utils import gather_object

    mine = list(range(rank, len(items), world))
    mine_items = [items[i] for i in mine]
    index_of = {id(item): i for item, i in zip(mine_items, mine)}
    errors: dict[int, str] = {}

    def my_progress(done: int, total: int) -> None:
        if progress:
            progress(min(done * world, len(items)), len(items))

    def my_error(item: TrainItem, exc: Exception) -> None:
        errors[index_of[id(item)]] = f"{exc.__class__.__name__}: {exc}"

    part, failed = encode_latents(vae, mine_items, disk_dir=disk_dir, progress=my_progress, on_error=my_error,
                                  **kwargs)
    ok = [i for j, i in enumerate(mine) if j not in set(failed)]
    if disk_dir is not None:
        accelerator.wait_for_everyone()  # every file is written; load them all (no encoding left to do)
        return encode_latents(vae, items, disk_dir=disk_dir, on_error=on_error, **kwargs)
    entries: dict[int, dict[str, torch.Tensor]] = {}
    all_errors: dict[int, str] = {}
    for indices, tensors, errs in gather_object([(ok, part.entries, errors)]):
        entries.update(zip(indices, tensors))
        all_errors.update(errs)
    for i in sorted(all_errors):
        if on_error:
            on_error(items[i], RuntimeError(all_errors[i]))
    return LatentCache([entries[i] for i in range(len(items)) if i in entries]), sorted(all_errors)


def cache_for_run(trainer, vae, vae_id: str, *, items: Sequence[TrainItem] | None = None,
                  stage: str = "caching latents", required: bool = True,
                  **kwargs) -> tuple[LatentCache, list[TrainItem]]:
    """A run's latents (``encode_latents_shared`` over ``items``, by default ``trainer.items``, in memory or on
    disk as ``cache_latents`` says) with progress events and a warning per unreadable image; returns the cache and the
    items that could be encoded. DatasetError when none could (unless not ``required``)."""
    from ..errors import DatasetError

    cfg = trainer.config
    items = list(trainer.items if items is None else items)
    disk = Path(cfg.output_dir) / ".cache" / "latents" if cfg.cache_latents == "disk" else None

    def progress(done: int, total: int) -> None:
        trainer.bus.emit(Progress(stage=stage, done=done, of=total))

    def on_error(item: TrainItem, exc: Exception) -> None:
        trainer.say(f"skipped {item.path.name}: cannot be decoded ({exc})", "warning")

    cache, failed = encode_latents_shared(  # split over the processes of a multi-GPU run
        vae, items, trainer.accelerator, device=trainer.accelerator.device, dtype=vae.dtype, disk_dir=disk,
        vae_id=vae_id, progress=progress, on_error=on_error, **kwargs)
    kept = [it for i, it in enumerate(items) if i not in set(failed)]
    if not kept and required:
        raise DatasetError("None of the images could be decoded; see the skipped files above.")
    return cache, kept
