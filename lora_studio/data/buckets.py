"""Aspect-ratio buckets: each image trains at a size near the target area whose shape is closest to its own.

Bucket sides are multiples of 64 (what the VAE and UNet need) and the area stays at or below
``resolution x resolution``, so a wide picture is not cropped to a square and memory per step stays even.
"""

from __future__ import annotations

import math

from PIL import Image

STEP = 64


def make_buckets(resolution: int, step: int = STEP, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """(width, height) pairs with sides multiple of ``step``, area <= resolution^2, ratio <= max_ratio."""
    area = resolution * resolution
    buckets = set()
    side = step
    while side <= resolution * max_ratio:
        other = (area // side) // step * step
        if other >= step and max(side, other) / min(side, other) <= max_ratio:
            buckets.add((side, other))
            buckets.add((other, side))
        side += step
    square = resolution // step * step
    buckets.add((square, square))
    return sorted(buckets)


def pick_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket with the closest aspect ratio (log scale), larger area on ties."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def resize_to_bucket(img: Image.Image, bucket: tuple[int, int]) -> tuple[Image.Image, tuple[int, int]]:
    """Scale ``img`` to cover ``bucket`` and center-crop it. Returns the image and the crop's top-left."""
    bw, bh = bucket
    scale = max(bw / img.width, bh / img.height)
    new = (max(bw, round(img.width * scale)), max(bh, round(img.height * scale)))
    img = img.resize(new, Image.Resampling.LANCZOS)
    left, top = (new[0] - bw) // 2, (new[1] - bh) // 2
    return img.crop((left, top, left + bw, top + bh)), (top, left)
