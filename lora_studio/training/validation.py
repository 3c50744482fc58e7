"""Validation: which samples are held out, the history of validation losses, and what it says.

A validation loss is measured on data the LoRA never trains on (``validation_split`` holds out a share of
the training set, ``validation_dir`` names other data: ``data.validation_set``), always the same way: the trainer's
``validation_loss`` uses fixed noise and timesteps spread evenly over the schedule (LLMs: the held-out rows,
which have no randomness), so two evaluations of the same weights give the same number, in another run
or after a resume too. The loop measures it every ``validation_every_steps``, at every checkpoint and at
the end; ``ValidationHistory`` keeps the results (in the checkpoints, for exact resume) and answers two
questions: which saved checkpoint had the lowest validation loss (the one to ship, marked "recommended"),
and whether the run overfits (the validation loss rose for ``OVERFIT_EVALS`` evaluations in a row while the
training loss fell).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

OVERFIT_EVALS = 3  # evaluations in a row with a rising validation loss (while training loss fell) = overfitting
VALIDATION_TIMESTEPS = 4  # per held-out image: timesteps at the centres of 4 equal parts of the schedule


def even_timesteps(num_train_timesteps: int, count: int = VALIDATION_TIMESTEPS) -> list[int]:
    """``count`` timesteps at the centres of equal parts of ``[0, num_train_timesteps)``."""
    return [int((k + 0.5) * num_train_timesteps / count) for k in range(count)]


@dataclass
class ValidationPoint:
    step: int
    loss: float
    train_loss: float | None  # mean training loss of the steps since the previous evaluation


@dataclass
class ValidationHistory:
    points: list[ValidationPoint] = field(default_factory=list)
    _train_sum: float = 0.0
    _train_count: int = 0
    warned: bool = False

    def add_training_loss(self, loss: float) -> None:
        self._train_sum += loss
        self._train_count += 1

    def add(self, step: int, loss: float) -> ValidationPoint:
        train = self._train_sum / self._train_count if self._train_count else None
        self._train_sum, self._train_count = 0.0, 0
        self.points = [p for p in self.points if p.step < step] + [ValidationPoint(step, float(loss), train)]
        return self.points[-1]

    def overfitting(self) -> bool:
        """True when the validation loss rose at each of the last ``OVERFIT_EVALS`` evaluations while the
        training loss fell over the same span."""
        last = self.points[-(OVERFIT_EVALS + 1):]
        if len(last) < OVERFIT_EVALS + 1:
            return False
        rising = all(b.loss > a.loss for a, b in zip(last, last[1:]))
        trains = [p.train_loss for p in last[1:]]
        falling = all(t is not None for t in trains) and trains[-1] < trains[0]
        return rising and falling

    def best(self, steps: Iterable[int]) -> ValidationPoint | None:
        """The point with the lowest validation loss among ``steps`` (those with a saved LoRA file)."""
        wanted = set(steps)
        candidates = [p for p in self.points if p.step in wanted]
        return min(candidates, key=lambda p: (p.loss, -p.step)) if candidates else None

    def state_dict(self) -> dict[str, Any]:
        return {"points": [(p.step, p.loss, p.train_loss) for p in self.points], "train_sum": self._train_sum,
                "train_count": self._train_count, "warned": self.warned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.points = [ValidationPoint(int(s), float(v), t) for s, v, t in state.get("points", [])]
        self._train_sum = float(state.get("train_sum", 0.0))
        self._train_count = int(state.get("train_count", 0))
        self.warned = bool(state.get("warned", False))


def overfit_message(history: ValidationHistory) -> str:
    last = history.points[-(OVERFIT_EVALS + 1):]
    losses = " -> ".join(f"{p.loss:.4g}" for p in last)
    return (f"Overfitting: the validation loss rose for {OVERFIT_EVALS} evaluations in a row ({losses}, steps "
            f"{last[0].step}-{last[-1].step}) while the training loss fell. The LoRA is memorising its training "
            "images; an earlier checkpoint is likely better (see the recommended one at the end), or train fewer "
            "steps, lower learning_rate, or add images.")


def recommendation_text(point: ValidationPoint, final_step: int) -> str:
    where = "the final LoRA" if point.step == final_step else f"the checkpoint at step {point.step}"
    return f"Lowest validation loss: {where} ({point.loss:.5g}); it is marked recommended."
