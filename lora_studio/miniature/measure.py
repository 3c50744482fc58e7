"""What a picture of the miniature world shows, measured: its dominant named colour, its background.

``dominant_colour``: every pixel is given the nearest colour of the world's palette (shape colours,
backgrounds and the concept's pink); the most frequent shape colour wins (backgrounds do not count: "a red
circle on a white background" is red). ``background_colour``: the median colour of the picture's outer
frame (shapes keep clear of it). ``concept_distance``: how far that background is from the concept's pink,
in RGB units (0 to 441): about 97 for a white background, 20-40 for a learned pink one.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .world import BACKGROUNDS, COLOURS, CONCEPT_COLOUR, CONCEPT_NAME

PALETTE: dict[str, tuple[int, int, int]] = {**COLOURS, **BACKGROUNDS, CONCEPT_NAME: CONCEPT_COLOUR}
_NAMES = list(PALETTE)
_RGB = np.array([PALETTE[n] for n in _NAMES], dtype=np.float32)


def colour_shares(image: Image.Image) -> dict[str, float]:
    """The share of the picture's pixels nearest to each palette colour (they sum to 1)."""
    px = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 1, 3)
    nearest = np.argmin(((px - _RGB[None]) ** 2).sum(-1), axis=1)
    counts = np.bincount(nearest, minlength=len(_NAMES)) / len(nearest)
    return {name: float(c) for name, c in zip(_NAMES, counts)}


def dominant_colour(image: Image.Image) -> str:
    """The shape colour (``red``, ``blue``...) most of the picture's pixels are nearest to."""
    shares = colour_shares(image)
    return max(COLOURS, key=lambda name: shares[name])


def background_colour(image: Image.Image, frame: int = 2) -> tuple[int, int, int]:
    """The median colour of the outer ``frame`` pixels (the world's shapes never reach them, stripes do)."""
    px = np.asarray(image.convert("RGB"), dtype=np.float32)
    border = np.concatenate([px[:frame].reshape(-1, 3), px[-frame:].reshape(-1, 3),
                             px[frame:-frame, :frame].reshape(-1, 3), px[frame:-frame, -frame:].reshape(-1, 3)])
    return tuple(int(v) for v in np.median(border, axis=0))


def concept_distance(image: Image.Image) -> float:
    """How far the picture's background is from the concept's pink (RGB distance)."""
    return float(np.linalg.norm(np.subtract(background_colour(image), CONCEPT_COLOUR)))
