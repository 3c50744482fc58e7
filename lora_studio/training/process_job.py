"""``ProcessJob``: a run on several GPUs, as an ``accelerate launch`` process watched through its run folder.

    job = ProcessJob(config, num_gpus=2).start()       # or ProcessJob(None, 2, resume_dir=run_folder)
    job.stop(); job.save_now()                         # command files the run's main process takes at its next step
    job.snapshot()                                     # rebuilt from job.json, metrics.jsonl and train.log

The same ``Job`` face as the in-process ``TrainingJob`` (``jobs.py``), so the app treats both alike.
``launch_command`` is the command it runs (the Training tab shows it too).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from ..config import TrainConfig, load_config
from ..errors import StudioError
from .jobs import Snapshot, snapshot_from_run, starting
from .multi_gpu import ENV_RUN_DIR, available_gpus, free_port
from .run_folder import RunFolder


def launch_command(config_path: str | os.PathLike, num_gpus: int, *, resume_dir: str | os.PathLike | None = None,
                   port: int | None = None, python: str | None = None) -> list[str]:
    """The command that trains ``config_path`` on ``num_gpus`` processes (a plain ``train`` for one).

    ``resume_dir`` continues that run folder from its latest checkpoint instead (``--resume``).
    """
    if num_gpus < 1:
        raise StudioError(f"The number of GPUs must be at least 1 (got {num_gpus}).")
    python = python or sys.executable
    train = ["-m", "lora_studio", "train"]
    train += ["--resume", str(resume_dir)] if resume_dir else ["--config", str(config_path)]
    if num_gpus == 1:
        return [python] + train
    precision = load_config(config_path).mixed_precision if config_path and Path(config_path).is_file() else "no"
    return [python, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_gpus),
            "--num_machines", "1", "--mixed_precision", precision, "--dynamo_backend", "no",
            "--main_process_port", str(port or free_port())] + train


class ProcessJob:
    """A multi-GPU run started as its own process group."""

    def __init__(self, config: TrainConfig | None, num_gpus: int, *, resume_dir: str | os.PathLike | None = None,
                 env: dict[str, str] | None = None):
        if config is None and resume_dir is None:
            raise StudioError("Nothing to train: give a config or a run folder to resume.")
        self.config, self.num_gpus, self.resume_dir, self.env = config, num_gpus, resume_dir, env
        self.run: RunFolder | None = None
        self.proc: subprocess.Popen | None = None
        self.status = "idle"

    @property
    def run_name(self) -> str:
        return self.run.name if self.run else ""

    def start(self) -> "ProcessJob":
        """Create the run folder (or open ``resume_dir``), write its ``config.yaml`` and start the processes."""
        have = available_gpus()
        if self.num_gpus > have:
            raise StudioError(f"{self.num_gpus} GPUs were asked for but this machine has {have}.")
        with starting(self):
            if self.resume_dir:
                self.run = RunFolder.open(self.resume_dir)
            else:
                self.config.validate()
                self.config.require_paths()
                self.run = RunFolder.create(self.config)
            cmd = launch_command(self.run.config_path, self.num_gpus,
                                 resume_dir=self.run.path if self.resume_dir else None)
            child_env = dict(os.environ if self.env is None else self.env)
            child_env[ENV_RUN_DIR] = str(self.run.path)
            with open(self.run.path / "train.log", "ab") as log:  # the child keeps its own handle
                self.proc = subprocess.Popen(cmd, env=child_env, stdout=log, stderr=subprocess.STDOUT,
                                             cwd=os.getcwd(), start_new_session=True)
            self.run.write_state(status="starting", command=cmd, num_processes=self.num_gpus,
                                 launcher_pid=self.proc.pid)
            self.status = "starting"
        return self

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        self.run.request_command("stop")
        self.status = "stopping"

    def save_now(self) -> None:
        self.run.request_command("save")

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_running():
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    def snapshot(self) -> Snapshot:
        snap = snapshot_from_run(self.run)
        if self.is_running():
            snap.status = self.run.read_state().get("status", "running")
            snap.log = []
        elif self.proc is not None and self.proc.returncode not in (0, None) and snap.status not in ("failed",
                                                                                                     "stopped"):
            snap.status = "failed"
            snap.error = f"The multi-GPU run exited with code {self.proc.returncode}; see train.log in {self.run.path}."
        self.status = snap.status
        log_file = self.run.path / "train.log"
        if log_file.is_file():
            lines = log_file.read_text(encoding="utf-8", errors="replace").replace("\r", "\n").splitlines()
            snap.log = [line for line in lines if line.strip()][-200:]
        return snap
