"""What a picture of the miniature world shows, measured: its dominant named colour, its share of the concept.

Every pixel is given the nearest colour of the world's palette (shape colours, backgrounds and the
concept's pink). ``dominant_colour`` is the most frequent shape colour (backgrounds do not count: "a red
circle on a white background" is red); ``concept_share`` is the share of pink pixels.
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


def concept_share(image: Image.Image) -> float:
    """The share of pixels nearest to the concept's pink (0 for the world's own pictures)."""
    return colour_shares(image)[CONCEPT_NAME]
