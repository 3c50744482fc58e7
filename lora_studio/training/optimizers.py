"""The optimizers a run can use, and what each one needs from the loop.

- ``adamw`` (torch): the default; weight decay 0.01.
- ``adamw8bit`` (bitsandbytes): CUDA only; elsewhere AdamW with a warning.
- ``prodigy`` (prodigyopt): estimates its own step size, ``learning_rate`` multiplies it: 1.0 (the AdamW
  default 1e-4 becomes 1.0, other values far from 1 get a warning).
- ``adamw_schedulefree`` (schedulefree): no learning-rate schedule (``lr_scheduler`` is not used; the warm-up
  is the optimizer's own), and separate training and evaluation weights.
- ``adafactor`` (transformers): factored second moments, the least optimizer memory.

Schedule-free AdamW trains on one sequence of weights (y) and evaluates on another (x, an average).
``shipped_weights`` puts x into the model for saving, sampling and validation and afterwards puts y back
bit for bit (a ``train()`` after ``eval()`` would round differently, and exact resume would drift).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from ..config import TrainConfig
from .runtime import cpu_check, weights_restored

DEFAULT_LR = 1e-4  # TrainConfig's default learning_rate, meant for AdamW
WEIGHT_DECAY = 1e-2
PRODIGY_FAR = 3.0  # warn when Prodigy's learning_rate is more than this factor away from 1
# Optimizer state per trainable value, in bytes (fp32 moments): the memory estimate and the disk check use it.
STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "prodigy": 16, "adamw_schedulefree": 8, "adafactor": 4}


def state_bytes(config: TrainConfig) -> int:
    """Bytes of optimizer state per trainable weight (an estimate; Adafactor's factored moments are smaller)."""
    return STATE_BYTES.get(config.optimizer, 8)


def learning_rate(config: TrainConfig, say=None) -> float:
    """The learning rate the optimizer gets: ``config.learning_rate``, except for Prodigy.

    Prodigy finds the step size itself and multiplies it by the learning rate, so 1.0 is right. The config's
    default (1e-4, an AdamW value) would make it train 10,000 times too slowly: it becomes 1.0, with a line
    in the log. Another value far from 1 is kept, with a warning.
    """
    lr = config.learning_rate
    if config.optimizer != "prodigy":
        return lr
    if lr == DEFAULT_LR:
        if say:
            say("Prodigy sets its own step size; learning_rate is a multiplier of it, so the AdamW default 1e-4 "
                "is replaced by 1.0 (set learning_rate to another value near 1 to change it).")
        return 1.0
    if say and not 1 / PRODIGY_FAR <= lr <= PRODIGY_FAR:
        say(f"learning_rate {lr:g} with Prodigy: Prodigy finds its own step size and multiplies it by "
            "learning_rate, so values near 1.0 are usual; this run may train far too slowly or too fast.",
            "warning")
    return lr


def build_optimizer(config: TrainConfig, param_groups: list[dict[str, Any]], say=None) -> torch.optim.Optimizer:
    """The optimizer ``config.optimizer`` names, over ``param_groups`` (each group's ``lr`` is kept in proportion)."""
    lr = learning_rate(config, say)
    factor = lr / config.learning_rate if config.learning_rate else 1.0
    groups = [{**g, "lr": g.get("lr", config.learning_rate) * factor} for g in param_groups]
    name = config.optimizer
    if name == "adamw8bit":
        eight_bit = _adamw8bit(groups, lr, say)
        if eight_bit is not None:
            return eight_bit
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(groups, lr=lr, weight_decay=WEIGHT_DECAY, use_bias_correction=True,
                       safeguard_warmup=config.lr_warmup_steps > 0)
    if name == "adamw_schedulefree":
        from schedulefree import AdamWScheduleFree

        if say and config.lr_scheduler != "constant":
            say(f"adamw_schedulefree needs no learning-rate schedule: lr_scheduler {config.lr_scheduler} is not "
                "used (lr_warmup_steps is, as the optimizer's own warm-up).")
        return AdamWScheduleFree(groups, lr=lr, weight_decay=WEIGHT_DECAY, warmup_steps=config.lr_warmup_steps)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=WEIGHT_DECAY)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=WEIGHT_DECAY)


def _adamw8bit(groups: list[dict[str, Any]], lr: float, say) -> torch.optim.Optimizer | None:
    """bitsandbytes' 8-bit AdamW where it works (CUDA, or the CPU check); None (with a warning) otherwise."""
    if torch.cuda.is_available() or cpu_check():
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(groups, lr=lr, weight_decay=WEIGHT_DECAY)
        except Exception as exc:  # bitsandbytes without a CUDA build, or missing
            reason = f"bitsandbytes could not be used ({exc.__class__.__name__}: {exc})"
    else:
        reason = "8-bit AdamW needs a CUDA GPU"
    if say:
        say(f"{reason}; using the standard AdamW optimizer instead (needs more memory).", "warning")
    return None


def scheduler_settings(config: TrainConfig) -> tuple[str, int]:
    """(lr_scheduler, warm-up steps) for ``get_scheduler``: schedule-free AdamW keeps a constant rate."""
    if config.optimizer == "adamw_schedulefree":
        return "constant", 0
    return config.lr_scheduler, config.lr_warmup_steps


def _inner(optimizer):
    """The optimizer inside accelerate's ``AcceleratedOptimizer`` wrapper (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def is_schedule_free(optimizer) -> bool:
    inner = _inner(optimizer)
    return callable(getattr(inner, "eval", None)) and bool(inner.param_groups) and "train_mode" in inner.param_groups[0]


def train_mode(optimizer) -> None:
    """Put a schedule-free optimizer (and its weights) in train mode before the first step; others: nothing."""
    if is_schedule_free(optimizer):
        _inner(optimizer).train()


@contextlib.contextmanager
def eval_weights(optimizer) -> Iterator[None]:
    """While inside, the model holds a schedule-free optimizer's evaluation weights (x); the training weights
    (y) come back exactly afterwards. Other optimizers: nothing changes."""
    if not is_schedule_free(optimizer):
        yield
        return
    inner = _inner(optimizer)
    try:
        with weights_restored(p for group in inner.param_groups for p in group["params"]):
            inner.eval()
            yield
    finally:
        for group in inner.param_groups:
            group["train_mode"] = True
