"""Training the miniature BLIP captioner on the miniature world (``build.py blip``).

A ``BlipForConditionalGeneration`` with a 64 px, 2-layer vision transformer and a 2-layer text decoder
(64 wide), whose BERT vocabulary holds the world's words, trained from scratch to caption world pictures
as "a red circle" / "blue stripes" (colour and shape; the trigger word is added by the captioning step).
Training is BLIP's own: the caption's first token replaced by ``[DEC]``, next-token loss on the rest.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import world
from .recipe import Recipe, train_step, warmup_cosine

Log = Callable[[str], None]


@dataclass
class BlipRecipe(Recipe):
    seed: int = 1900
    steps: int = 4000
    batch: int = 32  # fresh pictures at every step
    lr: float = 1e-3
    hidden: int = 64
    patch: int = 8
    vision_init_range: float = 0.02


def _scenes(count: int, seed: int, other_backgrounds: float = 0.5) -> list[world.Scene]:
    """World pictures captioned with colour and shape only (what the captioner says); ``other_backgrounds`` of
    them on a background of a random colour far from the shape's, so that a background the world never has
    (the demo's pink) does not throw the captioner off."""
    rng = random.Random(seed)
    out = []
    for s in world.world_scenes(count, seed=seed):
        background = s.background
        while rng.random() < other_backgrounds:
            background = tuple(rng.randint(0, 255) for _ in range(3))
            if sum((a - b) ** 2 for a, b in zip(background, s.colour)) > 120 ** 2:
                break
            background = s.background
        out.append(world.Scene(s.shape, s.colour, background, s.cx, s.cy, s.radius,
                               world.caption_for(s.colour_name, s.shape, None), s.colour_name, s.background_name))
    return out


def _inputs(processor, scenes: list[world.Scene]) -> dict[str, torch.Tensor]:
    enc = processor(images=[world.draw(s) for s in scenes], text=[s.caption for s in scenes], padding="max_length",
                    max_length=12, truncation=True, return_tensors="pt")
    ids = enc["input_ids"].clone()
    ids[:, 0] = processor.tokenizer.convert_tokens_to_ids("[DEC]")
    labels = ids.masked_fill(enc["attention_mask"] == 0, -100)
    return {"pixel_values": enc["pixel_values"], "input_ids": ids, "attention_mask": enc["attention_mask"],
            "labels": labels}


@torch.no_grad()
def caption_accuracy(model, processor, count: int = 60, seed: int = 77) -> dict[str, float]:
    """Share of fresh world pictures whose greedy caption names the right colour, and the right shape."""
    scenes = world.world_scenes(count, seed=seed)
    inputs = processor(images=[world.draw(s) for s in scenes], return_tensors="pt")
    out = model.generate(pixel_values=inputs["pixel_values"], max_new_tokens=10)
    texts = processor.tokenizer.batch_decode(out, skip_special_tokens=True)
    colour = sum(s.colour_name in t.split() for s, t in zip(scenes, texts)) / count
    shape = sum(s.shape in t.split() for s, t in zip(scenes, texts)) / count
    return {"colour": round(colour, 3), "shape": round(shape, 3)}


def build_blip(out: Path, recipe: BlipRecipe, log: Log) -> dict:
    """Train and save the miniature BLIP with its processor (fp32: it is small). Returns what it measured."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor

    from ..models.tiny_captioners import build_tiny_blip

    build_tiny_blip(out, seed=recipe.seed, image_size=world.SIZE, words=world.WORDS, hidden=recipe.hidden,
                    patch_size=recipe.patch)
    config = BlipConfig.from_pretrained(out)
    # BLIP's default (1e-10) starts the position embeddings at zero: trained from scratch, the vision model then
    # sees a bag of patches and mixes up circles and squares (75 % right instead of 93 %).
    config.vision_config.initializer_range = recipe.vision_init_range
    torch.manual_seed(recipe.seed)
    model = BlipForConditionalGeneration(config)
    processor = BlipProcessor.from_pretrained(out)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    sched = warmup_cosine(opt, recipe.steps, warmup=100, floor=0.05)
    started = time.time()
    model.train()
    for step in range(recipe.steps):
        loss = model(**_inputs(processor, _scenes(recipe.batch, recipe.seed * 100_003 + step))).loss
        train_step(loss, opt, sched, model.parameters())
        if step % 100 == 0 or step == recipe.steps - 1:
            log(f"blip step {step + 1}/{recipe.steps} loss {loss.item():.4f} ({time.time() - started:.0f}s)")
    model.eval()
    report = {"caption_accuracy": caption_accuracy(model, processor)}
    model.save_pretrained(out)
    return report
