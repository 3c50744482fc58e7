"""Held-out data for the validation loss: ``validation_split`` (a share of the training set) or ``validation_dir``.

``holdout`` chooses the held-out share by a hash of the seed and each sample's name, so the same images (or
rows) are held out on every run with that seed, whatever order they are listed in, and never trained on.
``image_validation_set`` applies it to a run's images (or reads ``validation_dir`` like a training folder).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Sequence

from ..errors import DatasetError


def holdout(keys: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(kept indices, held-out indices)``: a ``fraction`` of ``keys`` (at least one, never all)."""
    n = len(keys)
    if fraction <= 0 or n < 2:
        return list(range(n)), []
    count = min(max(1, math.ceil(fraction * n)), n - 1)
    ranked = sorted(range(n), key=lambda i: hashlib.blake2b(f"{seed}:{keys[i]}".encode(), digest_size=8).digest())
    held = set(ranked[:count])
    return [i for i in range(n) if i not in held], sorted(held)


def image_validation_set(items: list, folder: Path, config, resolution: int) -> tuple[list, list, str]:
    """``(training items, validation items, a sentence for the log)`` for ``config``'s validation keys."""
    from .captions import relative_name
    from .train_set import preflight

    if config.validation_dir:
        report = preflight(config.validation_dir, resolution, caption_extension=config.caption_extension,
                           enable_bucket=config.enable_bucket)
        for item in report.items:
            item.repeats = 1
        return items, list(report.items), (f"Validation: {len(report.items)} images from {config.validation_dir} "
                                            "(validation_dir).")
    if not config.validation_split:
        return items, [], ""
    if len(items) < 2:
        raise DatasetError("validation_split needs at least 2 usable images (one to train, one to hold out); "
                           "add images, or set validation_split to 0.")
    kept, held = holdout([relative_name(it.path, folder) for it in items], config.validation_split, config.seed)
    val = [items[i] for i in held]
    names = ", ".join(it.path.name for it in val[:8]) + (f" and {len(val) - 8} more" if len(val) > 8 else "")
    return ([items[i] for i in kept], val,
            f"Validation: {len(val)} of {len(items)} images held out (validation_split {config.validation_split:g}), "
            f"never trained on: {names}.")
