"""An exponential moving average (EMA) of the LoRA weights, kept in CPU memory.

After every optimizer step ``update`` moves each average a little towards the current weights:
``ema = d * ema + (1 - d) * weight`` with ``d = min(ema_decay, (1 + n) / (10 + n))`` after ``n`` updates (the
usual warm-up, so the first steps do not pin the average to the random start). The copy lives on the CPU
(a LoRA is small; the GPU keeps only the weights it trains). ``applied`` puts the averages into the model
for saving, sampling, validation and the export, and puts the trained weights back exactly afterwards.
``state_dict`` goes into every checkpoint, so a resumed run continues the same average.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch


class EMA:
    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float):
        self.decay = float(decay)
        self.updates = 0
        self.shadow = [p.detach().to("cpu", torch.float32).clone() for p in params]

    def current_decay(self) -> float:
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, params: Sequence[torch.nn.Parameter]) -> None:
        weight = 1.0 - self.current_decay()
        for avg, p in zip(self.shadow, params):
            avg.lerp_(p.detach().to("cpu", torch.float32), weight)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self, params: Sequence[torch.nn.Parameter]) -> Iterator[None]:
        """The averaged weights in the model while inside; the trained ones come back bit for bit."""
        from .runtime import weights_restored

        with weights_restored(params):
            with torch.no_grad():
                for p, avg in zip(params, self.shadow):
                    p.copy_(avg.to(p.device, p.dtype))
            yield

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": [t.clone() for t in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["shadow"]) != len(self.shadow) or any(
                a.shape != b.shape for a, b in zip(state["shadow"], self.shadow)):
            raise ValueError("the checkpoint's EMA weights do not match this LoRA")
        self.updates = int(state["updates"])
        self.shadow = [t.to("cpu", torch.float32).clone() for t in state["shadow"]]
