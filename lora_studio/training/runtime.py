"""Where a run executes: the accelerate ``Accelerator``, precision, optimizer and memory readings.

On a machine without CUDA the run falls back to the CPU in full precision and says so once. 8-bit AdamW
needs bitsandbytes with CUDA; without it the run uses AdamW and says so. ``LORA_STUDIO_CPU_CHECK=1`` keeps
bf16 and 8-bit AdamW on the CPU (``cpu_check``), to check those code paths without a GPU.
"""

from __future__ import annotations

import contextlib
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

    from ..hardware import adapt_precision, device_kind, mps_supports_bf16

    # On the CPU fp16 stays off (no loss scaling there); under cpu_check bf16 runs there. MPS: bf16 or fp32.
    kind = device_kind()
    precision, note = adapt_precision(config.mixed_precision, kind, cpu_check=cpu_check(),
                                      bf16_ok=kind == "mps" and mps_supports_bf16())
    if note and say:
        say(note)
    from .multi_gpu import accelerator_kwargs, check_world, is_distributed

    if not is_distributed():
        _forget_previous_precision(precision)
    accelerator = Accelerator(mixed_precision=precision, project_config=ProjectConfiguration(
        project_dir=config.output_dir, automatic_checkpoint_naming=False), **accelerator_kwargs(config))
    check_world(accelerator)  # several launched processes must form one group (multi_gpu)
    return accelerator


def _forget_previous_precision(precision: str) -> None:
    """Let this run use its own precision after an earlier run in the same process used another.

    accelerate keeps one ``AcceleratorState`` per process and refuses a second ``Accelerator`` with other
    mixed precision ("AcceleratorState has already been initialized and cannot be changed"). The app trains
    one run after another in one process (a bf16 preset, then an fp16 one), one at a time, so the state of
    the finished run is dropped here; the process group (``PartialState``) is kept. Only for a single
    process: under ``accelerate launch`` every process trains one run.
    """
    from accelerate.state import AcceleratorState

    previous = AcceleratorState._shared_state.get("_mixed_precision")
    if previous is not None and previous != precision:
        AcceleratorState._reset_state()


def cpu_check() -> bool:
    """``LORA_STUDIO_CPU_CHECK=1``: run the GPU presets' settings on the CPU as asked (bf16 mixed precision,
    8-bit AdamW, 4-bit QLoRA through bitsandbytes' CPU kernels) instead of their plain versions. Slow, and
    meant for checking those code paths without a GPU, as the tests do."""
    return os.environ.get("LORA_STUDIO_CPU_CHECK") == "1"


def weight_dtype(accelerator) -> torch.dtype:
    """The dtype of frozen weights: half precision on a GPU run with mixed precision, else fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


@contextlib.contextmanager
def full_precision_forward(*models: torch.nn.Module):
    """Run models that ``accelerator.prepare`` wrapped for mixed precision without that wrapper for a while.

    With fp16/bf16, accelerate replaces a prepared model's ``forward`` by one that runs under autocast (and
    keeps the original as ``_original_forward``); ``unwrap_model`` keeps that wrapper. The export check
    renders the trained model in float32 to compare it with a fresh float32 pipeline, so the wrapper is
    lifted here and put back afterwards (training or sampling may go on after the check).
    """
    lifted = []
    for model in models:
        original = model.__dict__.get("_original_forward")
        if original is not None and "forward" in model.__dict__:
            lifted.append((model, model.__dict__["forward"]))
            model.forward = original
    try:
        yield
    finally:
        for model, wrapped in lifted:
            model.forward = wrapped


def build_optimizer(config: TrainConfig, param_groups: list[dict[str, Any]], say=None) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW where it works (CUDA); falls back to AdamW with a message."""
    if config.optimizer == "adamw8bit":
        if torch.cuda.is_available() or cpu_check():
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
    elif device is not None and device.type == "mps":
        out["gpu_allocated_gb"] = round(torch.mps.current_allocated_memory() / 1e9, 3)
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


def enable_checkpointing(model: torch.nn.Module, use_reentrant: bool | None = None, **options: Any) -> None:
    """Activation (gradient) checkpointing on a transformers model, by its newer name where it has one
    (``activation_checkpointing_enable``; ``gradient_checkpointing_enable`` is deprecated in transformers 5).
    ``options`` go to ``torch.utils.checkpoint`` (e.g. ``context_fn``)."""
    if use_reentrant is not None:
        options["use_reentrant"] = use_reentrant
    options = options or None
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
