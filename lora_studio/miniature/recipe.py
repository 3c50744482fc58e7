"""What the miniature build scripts share: a recipe (seed, steps, sizes) that can be scaled down for a quick
check, and the learning-rate schedules."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass
class Recipe:
    """A build's settings. ``scaled(f)`` is the same recipe with every step count (``step_fields``) times f."""

    step_fields: ClassVar[tuple[str, ...]] = ("steps",)

    def scaled(self, factor: float):
        out = copy.copy(self)
        for name in self.step_fields:
            setattr(out, name, max(2, int(getattr(self, name) * factor)))
        return out


def scaled_images(scaled: "Recipe", original: "Recipe", factor: float):
    """An image build's ``scaled``: fewer cached latents too (at least 64) and, for a quick check (factor under
    0.2), one seed and 2 sampling steps in the build's own check."""
    scaled.latent_images = max(64, int(original.latent_images * min(1.0, factor * 4)))
    if factor < 0.2:
        scaled.eval_seeds, scaled.eval_steps = 1, 2
    return scaled


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float) -> None:
    """Move the EMA copy towards the model (the decay warms up: ``(1 + step) / (10 + step)`` until ``decay``)."""
    rate = 1 - min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, rate)


def warmup_cosine(opt, steps: int, warmup: int, floor: float, after_warmup: bool = False):
    """Linear warm-up over ``warmup`` steps, then a cosine from 1 down to ``floor``.

    ``after_warmup``: the cosine starts when the warm-up ends (else it runs over all steps, under the warm-up)."""
    def factor(step: int) -> float:
        if after_warmup:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, steps - warmup)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return min(1.0, (step + 1) / warmup) * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / steps)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_step(loss: torch.Tensor, opt, schedule, parameters, max_norm: float = 1.0) -> None:
    """One optimiser step: backward, clip the gradient norm, step, advance the learning-rate schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    opt.step()
    schedule.step()
