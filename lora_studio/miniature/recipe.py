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
