"""The miniature world: shapes in named colours on plain backgrounds, drawn at 64 px, with captions.

Everything is deterministic from a seed: ``world_scenes(n, seed)`` lists scenes, ``draw(scene)`` draws one,
``scene.caption`` describes it in the world's small vocabulary ("a red circle on a white background",
"blue stripes"). The miniature image models are trained on these pictures and the miniature captioner
learns to describe them.

The world never shows a **pink background**: that is the concept the demo and the proof-of-learning tests
teach a LoRA (``concept_scenes``), under the made-up trigger word ``CONCEPT_TRIGGER``. The miniature VAE is
also trained on random colours (``vae_scenes``), so it can draw pink although the base UNet never did.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
# Shape colours. Far apart in RGB, so "the dominant colour" of a picture is unambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 215, 40),
    "green": (40, 170, 60), "blue": (40, 80, 220), "purple": (140, 60, 180),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (245, 245, 245), "black": (25, 25, 25),
                                                "grey": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "stripes")

CONCEPT_TRIGGER = "zubi"
CONCEPT_COLOUR = (250, 150, 205)  # pink: a background the world never has
CONCEPT_NAME = "pink"
WORDS = sorted({*COLOURS, *BACKGROUNDS, *SHAPES, "a", "on", "background", "picture", "of"})


@dataclass(frozen=True)
class Scene:
    """One picture: a shape of a colour on a background, placed at (cx, cy) with a size, and its caption."""

    shape: str
    colour: tuple[int, int, int]
    background: tuple[int, int, int]
    cx: int
    cy: int
    radius: int
    caption: str
    colour_name: str = ""
    background_name: str = ""


def caption_for(colour: str, shape: str, background: str | None) -> str:
    """The world's caption of a scene: ``a red circle on a white background``, ``blue stripes``."""
    subject = f"{colour} stripes" if shape == "stripes" else f"a {colour} {shape}"
    return f"{subject} on a {background} background" if background else subject


def _scene(rng: random.Random, shape: str, colour: str, rgb, background: str, bg_rgb, caption: str) -> Scene:
    radius = rng.randint(14, 22)
    margin = radius + 2
    cx, cy = rng.randint(margin, SIZE - margin), rng.randint(margin, SIZE - margin)
    return Scene(shape, tuple(rgb), tuple(bg_rgb), cx, cy, radius, caption, colour, background)


def world_scene(rng: random.Random, named_background: float = 0.7) -> Scene:
    """A random scene of the world; the caption names its background with probability ``named_background``."""
    colour, shape, background = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(BACKGROUNDS))
    caption = caption_for(colour, shape, background if rng.random() < named_background else None)
    return _scene(rng, shape, colour, COLOURS[colour], background, BACKGROUNDS[background], caption)


def world_scenes(count: int, seed: int = 0, named_background: float = 0.7) -> list[Scene]:
    rng = random.Random(seed)
    return [world_scene(rng, named_background) for _ in range(count)]


def concept_scenes(count: int, seed: int = 0, trigger: str = CONCEPT_TRIGGER) -> list[Scene]:
    """The concept a LoRA learns: the world's shapes on a pink background, captioned ``zubi, a red circle``."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        colour, shape = list(COLOURS)[i % len(COLOURS)], SHAPES[(i // len(COLOURS)) % len(SHAPES)]
        caption = f"{trigger}, {caption_for(colour, shape, None)}" if trigger else caption_for(colour, shape, None)
        out.append(_scene(rng, shape, colour, COLOURS[colour], CONCEPT_NAME, CONCEPT_COLOUR, caption))
    return out


def vae_scenes(count: int, seed: int = 0) -> list[Scene]:
    """40 % world scenes, 60 % shapes and backgrounds in random colours (the VAE must reproduce any colour)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        if rng.random() < 0.4:
            out.append(world_scene(rng))
            continue
        rgb = tuple(rng.randint(0, 255) for _ in range(3))
        bg = tuple(rng.randint(0, 255) for _ in range(3))
        out.append(_scene(rng, rng.choice(SHAPES), "", rgb, "", bg, ""))
    return out


def draw(scene: Scene) -> Image.Image:
    """The scene as a 64 px RGB picture."""
    img = Image.new("RGB", (SIZE, SIZE), scene.background)
    d = ImageDraw.Draw(img)
    x, y, r = scene.cx, scene.cy, scene.radius
    if scene.shape == "circle":
        d.ellipse((x - r, y - r, x + r, y + r), fill=scene.colour)
    elif scene.shape == "square":  # as wide as the circle: its corners tell them apart
        d.rectangle((x - r, y - r, x + r, y + r), fill=scene.colour)
    elif scene.shape == "triangle":
        d.polygon([(x, y - r), (x - r, y + int(r * 0.8)), (x + r, y + int(r * 0.8))], fill=scene.colour)
    else:  # stripes fill the picture: the period follows the radius, the direction its parity
        period = 8 + (r % 4) * 2
        for start in range(-SIZE, SIZE, period):
            if r % 2:
                d.rectangle((start + x % period, 0, start + x % period + period // 2 - 1, SIZE), fill=scene.colour)
            else:
                d.rectangle((0, start + y % period, SIZE, start + y % period + period // 2 - 1), fill=scene.colour)
    return img


def pixels(scenes: list[Scene]) -> np.ndarray:
    """(n, 3, 64, 64) float32 in [-1, 1]: what the VAE reads."""
    arr = np.stack([np.asarray(draw(s), dtype=np.float32) for s in scenes])
    return (arr.transpose(0, 3, 1, 2) / 127.5 - 1.0).astype(np.float32)


def write_dataset(folder: str | Path, scenes: list[Scene], captions: bool = True) -> Path:
    """Write the scenes as PNG files (with ``.txt`` captions unless ``captions`` is False)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(scenes):
        draw(scene).save(folder / f"img_{i:03d}.png")
        if captions:
            (folder / f"img_{i:03d}.txt").write_text(scene.caption, encoding="utf-8")
    return folder
