"""Training-tab helpers that need no gradio: the memory estimate line and the command line of a run.

Starting a run (in this process, or through ``accelerate launch`` on several GPUs) is the engine's
``training.jobs.start_job``.
"""

from __future__ import annotations

from pathlib import Path

from ..config import TrainConfig
from .train_family import estimate_family


def memory_text(cfg: TrainConfig, family: str | None, gpu_gb: float | None) -> str:
    """'Estimated peak GPU memory: about X GB (...)' plus a warning when it is above the detected GPU.

    ``family`` None: the config's model_family, else the family detected from its base model.
    """
    from ..training.memory import check_fits, estimate_breakdown, size_note
    from ..training.memory_flux import swap_note

    family = family or estimate_family(cfg)
    est = estimate_breakdown(cfg, family)
    text = f"**Estimated peak GPU memory:** {est} (an estimate, not yet measured on a GPU)."
    for note in (size_note(cfg, family), swap_note(cfg, family)):
        if note:
            text += f" {note}"
    if gpu_gb is None:
        return text + " No CUDA GPU detected here."
    warning = check_fits(cfg, family, gpu_gb)
    return text + (f"\n\n**Warning:** {warning}" if warning else f" Fits this GPU ({gpu_gb:.1f} GB).")


def command_text(config_path: Path, num_gpus: int, python: str, resume_dir: str | None = None) -> str:
    """The terminal command that trains ``config_path`` on ``num_gpus`` GPUs (or resumes ``resume_dir``)."""
    import shlex

    from ..training.process_job import launch_command

    cmd = launch_command(config_path, num_gpus, python=python, port=29500, resume_dir=resume_dir)
    if num_gpus > 1:  # show the familiar spelling of the same command
        cmd = ["accelerate", "launch"] + cmd[3:]
        cmd.remove("--main_process_port")
        cmd.remove("29500")
    return " ".join(shlex.quote(c) for c in cmd)
