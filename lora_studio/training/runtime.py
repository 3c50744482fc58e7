"""Where a run executes: the accelerate ``Accelerator``, precision, optimizer and memory readings.

On a machine without CUDA the run falls back to the CPU in full precision and says so once. 8-bit AdamW
needs bitsandbytes with CUDA; without it the run uses AdamW and says so.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable

import torch

from ..config import TrainConfig

log = logging.getLogger(__name__)


def make_accelerator(config: TrainConfig, say=None):
    """An Accelerator for this config; on CPU, mixed precision is turned off (with one message)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    precision = config.mixed_precision
    if not torch.cuda.is_available() and precision != "no":
        if say:
            say(f"No CUDA GPU found: training on the CPU in full precision (mixed_precision '{precision}' "
                "is ignored). This is fine for tiny tests; real models need a GPU.")
        precision = "no"
    from .multi_gpu import accelerator_kwargs, check_world

    accelerator = Accelerator(mixed_precision=precision, project_config=ProjectConfiguration(
        project_dir=config.output_dir, automatic_checkpoint_naming=False), **accelerator_kwargs(config))
    check_world(accelerator)  # several launched processes must form one group (multi_gpu)
    return accelerator


def weight_dtype(accelerator) -> torch.dtype:
    """The dtype of frozen weights: half precision on a GPU run with mixed precision, else fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def build_optimizer(config: TrainConfig, param_groups: list[dict[str, Any]], say=None) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW where it works (CUDA); falls back to AdamW with a message."""
    if config.optimizer == "adamw8bit":
        if torch.cuda.is_available():
            try:
                import bitsandbytes as bnb

                return bnb.optim.AdamW8bit(param_groups, lr=config.learning_rate, weight_decay=1e-2)
            except Exception as exc:  # bitsandbytes without a CUDA build, or missing
                reason = f"bitsandbytes could not be used ({exc.__class__.__name__}: {exc})"
        else:
            reason = "8-bit AdamW needs a CUDA GPU"
        if say:
            say(f"{reason}; using the standard AdamW optimizer instead (needs more memory).", "warning")
    return torch.optim.AdamW(param_groups, lr=config.learning_rate, weight_decay=1e-2)


def memory_gb(device: torch.device | None = None) -> dict[str, float]:
    """Peak GPU memory allocated (CUDA) and the process's resident memory, in GB."""
    out: dict[str, float] = {}
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        out["gpu_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
        out["gpu_reserved_gb"] = round(torch.cuda.memory_reserved() / 1e9, 3)
    try:
        import psutil

        out["ram_gb"] = round(psutil.Process(os.getpid()).memory_info().rss / 1e9, 3)
    except ImportError:  # pragma: no cover
        pass
    return out


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def all_finite(params: Iterable[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params)


def rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
