"""Disk faults of a run in one sentence: a read-only or full disk, a folder without write permission.

``write_fault(exc, folder, need)`` recognises a failed write (an ``OSError`` with EROFS, ENOSPC, EDQUOT,
EACCES or EPERM, also when torch or safetensors wrapped it in their own error) and says what happened to
which folder and what to do; ``None`` for anything else. ``run_bytes`` estimates what a run will write
(checkpoints kept at once, the exported files, samples, logs), and ``check_free_space`` refuses to start
training when the disk has less than that free.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from ..config import TrainConfig
from ..errors import TrainingError

FULL = (errno.ENOSPC, errno.EDQUOT)
DENIED = (errno.EACCES, errno.EPERM)
# What torch.save (a C++ writer) and safetensors (Rust) say when the disk fills up under them.
# torch.save reports a short write as "[enforce fail at inline_container.cc:...] . unexpected pos ...".
_FULL_TEXTS = ("No space left", "os error 28", "StorageFull", "Disk quota exceeded", "os error 122",
               "PytorchStreamWriter failed writing", "file write failed", "inline_container.cc")
_READ_ONLY_TEXTS = ("Read-only file system", "os error 30")
LOGS_MARGIN = 16 * 2**20  # metrics.jsonl, TensorBoard events, job.json, the card


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover


def free_bytes(folder: str | Path) -> int | None:
    """Free space on the disk holding ``folder`` (its nearest existing parent); None if unknown."""
    path = Path(folder).absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def fault_errno(exc: BaseException) -> int | None:
    """The disk errno behind ``exc`` (or what it wraps), or None when it is not a failed write."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.EROFS, *FULL, *DENIED):
            return exc.errno
        text = str(exc)
        if any(t in text for t in _READ_ONLY_TEXTS):
            return errno.EROFS
        if any(t in text for t in _FULL_TEXTS):
            return errno.ENOSPC
        exc = exc.__cause__ or exc.__context__
    return None


def write_fault(exc: BaseException, folder: str | Path, need: int | None = None) -> str | None:
    """One sentence for a failed write under ``folder`` (the cause and what to do), or None if ``exc`` is not one."""
    code = fault_errno(exc)
    if code is None:
        return None
    if code == errno.EROFS:
        return (f"Cannot write to '{folder}': it is on a read-only file system. Choose an output_dir on a disk "
                "that can be written to.")
    if code in DENIED:
        return f"Cannot write to '{folder}': permission denied. Choose an output_dir you can write to."
    free = free_bytes(folder)
    have = f"{human_bytes(free)} free" if free is not None else "no space left"
    wants = f"; this run needs about {human_bytes(need)} for its checkpoints and exported files" if need else ""
    return (f"The disk holding '{folder}' is full ({have}{wants}). Free some space, lower keep_checkpoints, "
            "or choose an output_dir on another disk.")


def run_bytes(config: TrainConfig, trainable: int, bytes_per_value: int, total_steps: int,
              resolution: int | None = None, extra_export: int = 0) -> tuple[int, str]:
    """About how much a run writes at most: ``(bytes, what it is made of)``.

    A checkpoint holds the LoRA file and the resume state (the LoRA again plus the optimizer's moments:
    two values per weight for AdamW, about half a value for 8-bit AdamW); ``keep_checkpoints`` of them
    exist at once, plus the one being written. The export is the LoRA in two formats (plus
    ``extra_export``, e.g. a merged LLM). Samples are counted at the training resolution.
    """
    lora = trainable * bytes_per_value
    moments = trainable * (2 if config.optimizer == "adamw8bit" else 8)
    checkpoint = 2 * lora + moments
    planned = total_steps // config.save_steps if config.save_steps else 0
    count = min(config.keep_checkpoints, planned) + 1  # the one being written before the oldest goes
    export = 2 * lora + extra_export
    samples = 0
    if config.sample_prompt and config.sample_steps:
        samples = (total_steps // config.sample_steps + 1) * (resolution or 512) ** 2 * 3 // 2
    need = count * checkpoint + export + samples + LOGS_MARGIN
    parts = (f"{count} checkpoint(s) of {human_bytes(checkpoint)}, the exported files {human_bytes(export)}"
             + (f", samples {human_bytes(samples)}" if samples else "") + ", logs")
    return need, parts


def checkpoint_note(run) -> str:
    """' The last good checkpoint is kept: ...' naming it only when one exists (a ``RunFolder``)."""
    latest = run.latest_checkpoint()
    if latest is None:
        return " No checkpoint had been saved yet, so Resume starts the run again from step 0."
    return f" The last good checkpoint is kept: {latest[1]} (press Resume, or use --resume, to continue from it)."


def check_free_space(folder: str | Path, need: int, parts: str) -> None:
    """Raise ``TrainingError`` when the disk holding ``folder`` has less than ``need`` bytes free."""
    free = free_bytes(folder)
    if free is not None and free < need:
        raise TrainingError(f"Not enough free disk space for this run in '{folder}': about {human_bytes(need)} is "
                            f"needed ({parts}), {human_bytes(free)} is free. Free some space, lower "
                            "keep_checkpoints, or choose an output_dir on another disk.")
