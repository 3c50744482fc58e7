"""``TrainingJob``: one training run on a background thread, watched through events, steered by commands.

    job = TrainingJob(config)            # or TrainingJob.resume(run_dir)
    job.start()
    job.stop()                           # takes effect at the next step; a checkpoint is saved
    job.snapshot()                       # status, step, total, losses, ETA, memory, log tail (for the UI)
    job.wait()

Only one job runs per process at a time (``start`` refuses a second one with a reason). The job writes
``job.json`` in its run folder as it goes, so a crashed process leaves a run that can be resumed.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from ..config import TrainConfig, merge
from ..errors import OutOfMemoryError, StudioError, TrainingError
from .events import Commands, Event, EventBus
from .multi_gpu import is_distributed
from .run_folder import RunFolder

log = logging.getLogger(__name__)

_active_lock = threading.Lock()
_active: "TrainingJob | None" = None

FINAL_STATES = ("finished", "failed", "stopped")


def make_trainer(config: TrainConfig, run: RunFolder, bus: EventBus):
    """The trainer for the config's model family (detected from the model files when 'auto')."""
    from ..models.loading import resolve_family

    family = resolve_family(config.model_family, config.base_model)
    if family == "llm":
        from .llm import LLMTrainer

        return LLMTrainer(config, run, bus)
    if family in ("flux", "chroma"):
        from .flux import make_flow_trainer

        return make_flow_trainer(config, run, bus, family)
    if family == "sdxl":
        from .sdxl import SDXLTrainer

        return SDXLTrainer(config, run, bus)
    from .diffusion import DiffusionTrainer

    return DiffusionTrainer(config, run, bus, family=family)


def active_job() -> "TrainingJob | None":
    """The job running in this process, if any."""
    return _active if _active is not None and _active.is_running() else None


class TrainingJob:
    def __init__(self, config: TrainConfig, run: RunFolder | None = None, resume: bool = False):
        self.config = config
        self.run = run
        self.resume_run = resume
        self.bus = EventBus()
        self.commands = Commands()
        self.status = "idle"
        self.error: str | None = None
        self.files: list[str] = []
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self.bus.subscribe(self._on_event)
        self._progress: dict[str, Any] = {}
        self._losses: list[tuple[int, float]] = []
        self._log: list[str] = []
        self._last_sample: str | None = None
        self._memory: dict[str, float] = {}

    @classmethod
    def resume(cls, run_dir: str | Path, overrides: dict[str, Any] | None = None) -> "TrainingJob":
        """A job that continues the run in ``run_dir`` from its latest checkpoint."""
        run = RunFolder.open(run_dir)
        config = run.load_config()
        if overrides:
            config = merge(config, overrides)
        job = cls(config, run=run, resume=True)
        job._losses = [(int(r["step"]), float(r["loss"])) for r in run.read_metrics() if "loss" in r]
        return job

    # --- control ---------------------------------------------------------------------------------
    def start(self) -> "TrainingJob":
        global _active
        with _active_lock:
            if _active is not None and _active.is_running():
                raise TrainingError(f"A training run is already in progress ({_active.run_name}); stop it or "
                                    "wait for it to finish before starting another.")
            self.config.validate()
            self.config.require_paths()
            if self.run is None:
                self.run = RunFolder.create(self.config)
            self.status = "starting"
            _active = self
        self._thread = threading.Thread(target=self._main, name=f"train-{self.run.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self.is_running():
            self.commands.request("stop")
            self.status = "stopping"

    def save_now(self) -> None:
        self.commands.request("save")

    def sample_now(self) -> None:
        self.commands.request("sample")

    def wait(self, timeout: float | None = None) -> bool:
        """True once the run has ended (finished, stopped or failed) and its thread has exited."""
        if not self._done.wait(timeout):
            return False
        if self._thread is not None:
            self._thread.join(timeout=30)
        return True

    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def run_name(self) -> str:
        return self.run.name if self.run else ""

    # --- the thread --------------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self.run.write_state(status="starting", pid_started_at=time.time())
            files = self._train_fitting()
            self.files = [str(f) for f in files]
            if self.status not in FINAL_STATES:
                self.status = "finished" if files else "stopped"
        except StudioError as exc:
            self._fail(str(exc))
        except Exception as exc:  # an unexpected bug: keep the traceback in the log, show one sentence
            log.exception("training crashed")
            self._log.append(traceback.format_exc())
            self._fail(f"Training crashed with an unexpected error: {exc.__class__.__name__}: {exc}. "
                       "The run can be resumed from its last checkpoint; please report this with the log.")
        finally:
            self._done.set()

    def _train_fitting(self) -> list[Path]:
        """``run_training``; on out-of-memory with ``auto_fit``, again with the next smaller setting, until it fits.

        Each step down is logged and stored in the run folder (``config.yaml`` gets the settings that fit,
        ``job.json`` the list of steps). A step that keeps the batch and the optimizer (gradient
        checkpointing) resumes from the last checkpoint; any other restarts the run from step 0, since
        checkpoints of another batch size or optimizer cannot be continued exactly.
        """
        from .loop import run_training
        from .memory import next_step_down

        resume, steps = self.resume_run, []
        while True:
            trainer = make_trainer(self.config, self.run, self.bus)
            self._check_memory(trainer)
            try:
                return run_training(trainer, self.commands, resume=resume)
            except OutOfMemoryError as exc:
                if not self.config.auto_fit or self.status in ("exporting", "verifying export"):
                    raise  # smaller training settings cannot help an export that ran out of memory
                step = next_step_down(self.config, getattr(trainer, "family", None))
                if is_distributed():  # the other processes wait in the next all-reduce: stop them all instead
                    advice = f" Start the run again with {step[1]}." if step else ""
                    raise OutOfMemoryError(f"{exc} With several GPUs auto_fit cannot step down while the run "
                                           f"goes on (the other processes would wait for this one).{advice}") from None
                if step is None:
                    raise OutOfMemoryError(f"{exc} auto_fit has already stepped down every setting it can "
                                           f"({'; '.join(steps) or 'none left'}).") from None
                self.config, change = step
                steps.append(change)
                resume = self._restart_after_step_down(change, steps)

    def _restart_after_step_down(self, change: str, steps: list[str]) -> bool:
        """Store the smaller config; True to resume from the last checkpoint, else clear the run's progress."""
        self.config.save(self.run.config_path)
        self.run.write_state(auto_fit_steps=steps)
        resume = change.startswith("gradient_checkpointing") and self.run.latest_checkpoint() is not None
        if not resume:
            import shutil

            for _, folder in self.run.list_checkpoints():
                shutil.rmtree(folder, ignore_errors=True)
            self.run.truncate_metrics(0)
            self._losses = []
        where = "resuming from the last checkpoint" if resume else "restarting from step 0"
        self.bus.log(f"Out of GPU memory: auto_fit steps down ({change}) and tries again, {where}.", "warning")
        return resume

    def _check_memory(self, trainer) -> None:
        """On a CUDA GPU, log the estimated peak memory, and a warning when it is above the card's memory."""
        from ..presets import detect_gpu
        from .memory import check_fits, estimate_breakdown

        gpu = detect_gpu()
        family = getattr(trainer, "family", None)
        if gpu is None or family is None:
            return
        warning = check_fits(self.config, family, gpu["memory_gb"])
        if warning:
            trainer.say(warning, "warning")
        else:
            trainer.say(f"Estimated peak GPU memory: {estimate_breakdown(self.config, family)} of the "
                        f"{gpu['memory_gb']:.1f} GB of {gpu['name']}.")

    def _fail(self, message: str) -> None:
        self.error = message
        self.status = "failed"
        try:
            self.run.write_state(status="failed", message=message)
        except OSError:
            pass
        self.bus.emit("failed", message=message)

    def _on_event(self, event: Event) -> None:
        d = event.data
        if event.kind == "progress":
            self._progress = d
        elif event.kind == "metrics":
            self._losses.append((int(d["step"]), float(d["loss"])))
            self._memory = {k: v for k, v in d.items() if k.endswith("_gb")}
        elif event.kind == "log":
            self._log.append(d["message"])
            self._log = self._log[-500:]
        elif event.kind == "state":
            if self.status not in ("stopping",) + FINAL_STATES:
                self.status = d["state"]
        elif event.kind == "sample":
            self._last_sample = d["path"]
        elif event.kind == "finished":
            self.status = "finished"
            self._log.append(d.get("message", "Finished."))
        elif event.kind == "stopped":
            self.status = "stopped"
            self._log.append(d.get("message", "Stopped."))
        elif event.kind == "failed":
            self._log.append("ERROR: " + d["message"])

    # --- for the UI ------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Everything a view needs, in plain types."""
        p = self._progress
        return {
            "run": self.run_name, "run_dir": str(self.run.path) if self.run else "", "status": self.status,
            "step": p.get("step", 0), "total": p.get("total", 0), "it_per_s": p.get("it_per_s", 0.0),
            "eta": p.get("eta", ""), "stage": p.get("stage", ""), "done": p.get("done"), "of": p.get("of"),
            "losses": list(self._losses), "memory": dict(self._memory), "log": list(self._log[-200:]),
            "sample": self._last_sample, "error": self.error, "files": list(self.files),
        }
