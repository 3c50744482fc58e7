"""Training-tab helpers that need no gradio: the memory estimate line, one or several GPUs, and a job-like
view of a multi-GPU run.

A run on several GPUs is a separate ``accelerate launch`` process (``training.multi_gpu.start_multi_gpu``);
``ProcessJob`` gives it the same face as an in-process ``TrainingJob`` (snapshot, stop, save now), read from
its run folder, so the tab polls both the same way. ``start_job`` is the one place that picks between them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..errors import StudioError
from ..training.job import TrainingJob
from ..training.run_folder import RunFolder
from .train_family import estimate_family
from .train_view import snapshot_from_run


def memory_text(cfg: TrainConfig, family: str | None, gpu_gb: float | None) -> str:
    """'Estimated peak GPU memory: about X GB (...)' plus a warning when it is above the detected GPU.

    ``family`` None: the config's model_family, else the family detected from its base model.
    """
    from ..training.memory import check_fits, estimate_breakdown, size_note

    family = family or estimate_family(cfg)
    est = estimate_breakdown(cfg, family)
    text = f"**Estimated peak GPU memory:** {est} (an estimate, not yet measured on a GPU)."
    note = size_note(cfg, family)
    if note:
        text += f" {note}"
    if gpu_gb is None:
        return text + " No CUDA GPU detected here."
    warning = check_fits(cfg, family, gpu_gb)
    return text + (f"\n\n**Warning:** {warning}" if warning else f" Fits this GPU ({gpu_gb:.1f} GB).")


def command_text(config_path: Path, num_gpus: int, python: str, resume_dir: str | None = None) -> str:
    """The terminal command that trains ``config_path`` on ``num_gpus`` GPUs (or resumes ``resume_dir``)."""
    import shlex

    from ..training.multi_gpu import launch_command

    cmd = launch_command(config_path, num_gpus, python=python, port=29500, resume_dir=resume_dir)
    if num_gpus > 1:  # show the familiar spelling of the same command
        cmd = ["accelerate", "launch"] + cmd[3:]
        cmd.remove("--main_process_port")
        cmd.remove("29500")
    return " ".join(shlex.quote(c) for c in cmd)


class ProcessJob:
    """A multi-GPU run started as its own process, watched through its run folder."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.run = RunFolder(Path(proc.run_dir))  # type: ignore[attr-defined]

    @property
    def run_name(self) -> str:
        return self.run.name

    def is_running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        from ..training.multi_gpu import request_command

        request_command(self.run.path, "stop")

    def save_now(self) -> None:
        from ..training.multi_gpu import request_command

        request_command(self.run.path, "save")

    def snapshot(self) -> dict[str, Any]:
        snap = snapshot_from_run(self.run)
        if self.is_running():
            snap["status"] = self.run.read_state().get("status", "running")
            snap["log"] = []
        elif self.proc.returncode not in (0, None) and snap["status"] not in ("failed", "stopped"):
            snap["status"] = "failed"
            snap["error"] = (f"The multi-GPU run exited with code {self.proc.returncode}; see train.log in "
                             f"{self.run.path}.")
        log_file = self.run.path / "train.log"
        if log_file.is_file():
            lines = log_file.read_text(encoding="utf-8", errors="replace").replace("\r", "\n").splitlines()
            snap["log"] = [line for line in lines if line.strip()][-200:]
        return snap


def start_on_gpus(cfg: TrainConfig, num_gpus: int, resume_dir: str | Path | None = None) -> ProcessJob:
    """``accelerate launch`` on ``num_gpus`` GPUs (a new run from ``cfg``, or continue ``resume_dir``)."""
    from ..training import multi_gpu

    have = multi_gpu.available_gpus()
    if num_gpus > have:
        raise StudioError(f"{num_gpus} GPUs were asked for but this machine has {have}.")
    return ProcessJob(multi_gpu.start_multi_gpu(cfg, num_gpus, resume_dir=resume_dir))


def start_job(cfg: TrainConfig | None, num_gpus: int = 1,
              resume_dir: str | Path | None = None) -> TrainingJob | ProcessJob:
    """Start (or resume ``resume_dir``): in this process on one GPU or the CPU, through accelerate on several.

    ``cfg`` may be None when resuming (the run folder's config.yaml is used).
    """
    num_gpus = max(int(num_gpus or 1), 1)
    if num_gpus > 1:
        if cfg is None:
            cfg = RunFolder.open(resume_dir).load_config()
        return start_on_gpus(cfg, num_gpus, resume_dir)
    if resume_dir is not None:
        return TrainingJob.resume(resume_dir).start()
    return TrainingJob(cfg).start()
