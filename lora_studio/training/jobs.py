"""One job interface for every way a run trains, and the one place that decides "one run at a time".

    job = start_job(config)                        # in this process, on a background thread (TrainingJob)
    job = start_job(config, num_gpus=2)            # accelerate launch on 2 GPUs, watched (ProcessJob)
    job = start_job(None, resume_dir=run_folder)   # continue a stopped or crashed run
    job.stop(); job.save_now(); job.snapshot(); job.wait(); job.status; job.run_dir
    current_job(), running_job()                   # what the app shows after a page reload

Both kinds of job implement ``Job``. ``starting(job)`` holds one lock from the check until the job runs, so
two clicks on Start at the same moment cannot start two runs.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

from ..config import TrainConfig
from ..errors import TrainingError
from .run_folder import RunFolder

FINAL_STATES = ("finished", "failed", "stopped")


@dataclass
class Snapshot:
    """Everything a view needs about a run, in plain types (the Training tab, the status API)."""
    run: str = ""
    run_dir: str = ""
    status: str = "idle"
    step: int = 0
    total: int = 0
    it_per_s: float = 0.0
    eta: str = ""
    stage: str = ""
    done: int | None = None
    of: int | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    memory: dict[str, float] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    sample: str | None = None
    error: str | None = None
    files: list[str] = field(default_factory=list)


class Job(Protocol):
    """What the app and the command line need from a run, wherever it trains."""

    run: RunFolder | None
    status: str

    def start(self) -> "Job": ...
    def stop(self) -> None: ...
    def save_now(self) -> None: ...
    def snapshot(self) -> Snapshot: ...
    def wait(self, timeout: float | None = None) -> bool: ...
    def is_running(self) -> bool: ...


_lock = threading.Lock()
_current: Job | None = None


def one_run_message(running: Job) -> str:
    name = running.run.name if running.run else "starting"
    return (f"A training run is already in progress ({name}); stop it or wait for it to finish before starting "
            "or resuming another.")


@contextlib.contextmanager
def starting(job: Job) -> Iterator[None]:
    """Hold the process-wide start lock while ``job`` starts; refuse when another job is running."""
    global _current
    with _lock:
        if _current is not None and _current is not job and _current.is_running():
            raise TrainingError(one_run_message(_current))
        yield
        _current = job


def current_job() -> Job | None:
    """The job started last in this process (running or not)."""
    return _current


def running_job() -> Job | None:
    job = _current
    return job if job is not None and job.is_running() else None


def start_job(config: TrainConfig | None, num_gpus: int = 1, resume_dir: str | Path | None = None) -> Job:
    """Start ``config`` (or continue ``resume_dir``): here on one GPU or the CPU, through accelerate on several."""
    num_gpus = max(int(num_gpus or 1), 1)
    if num_gpus > 1:
        from .process_job import ProcessJob

        return ProcessJob(config, num_gpus, resume_dir=resume_dir).start()
    from .job import TrainingJob

    if resume_dir is not None:
        return TrainingJob.resume(resume_dir).start()
    if config is None:
        raise TrainingError("Nothing to train: give a config or a run folder to resume.")
    return TrainingJob(config).start()


def snapshot_from_run(run: RunFolder) -> Snapshot:
    """A snapshot rebuilt from a run folder (a run not running in this process, or in another process)."""
    state = run.read_state()
    metrics = run.read_metrics()
    losses = [(int(r["step"]), float(r["loss"])) for r in metrics if "loss" in r]
    memory = {k: v for k, v in (metrics[-1] if metrics else {}).items() if str(k).endswith("_gb")}
    samples = sorted(run.samples_dir.glob("*.png")) if run.samples_dir.is_dir() else []
    status = state.get("status", "")
    if status in ("training", "starting", "created", "saving"):
        status = "interrupted"  # not running here: the app stopped or crashed while it trained
    log = [state["message"]] if state.get("message") else []
    if status == "interrupted":
        log.append("This run was interrupted (the app stopped while it trained). Press Resume to continue it "
                   "from its last checkpoint.")
    return Snapshot(run=run.name, run_dir=str(run.path), status=status, step=state.get("step", 0),
                    total=state.get("total", 0), losses=losses, memory=memory, log=log,
                    sample=str(samples[-1]) if samples else None,
                    error=state.get("message") if status == "failed" else None, files=state.get("files", []))
