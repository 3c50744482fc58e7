"""``TrainingJob``: one training run on a background thread of this process, watched through typed events.

    job = TrainingJob(config)            # or TrainingJob.resume(run_dir)
    job.start()                          # refused while another job of this process runs (jobs.starting)
    job.stop()                           # takes effect at the next step; a checkpoint is saved
    job.snapshot()                       # jobs.Snapshot: status, step, total, losses, ETA, memory, log tail
    job.wait()

The job writes ``job.json`` in its run folder as it goes, so a crashed process leaves a run that can be
resumed. With ``auto_fit`` an out-of-memory steps down to smaller settings and tries again.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from ..config import TrainConfig, merge
from ..errors import ConfigError, OutOfMemoryError, StudioError, TrainingError
from .events import Commands, Event, EventBus, Failed, Finished, Log, Metric, Progress, Sample, State, Stopped
from .events import Validation
from .jobs import FINAL_STATES, Snapshot, starting
from .memory import StepDown
from .multi_gpu import is_distributed, is_main_process
from .run_folder import RunFolder

log = logging.getLogger(__name__)

LOG_KEEP = 500


def make_trainer(config: TrainConfig, run: RunFolder, bus: EventBus):
    """The trainer of the config's model family (detected from the model files when 'auto')."""
    from ..families import get_family
    from ..models.detect import resolve_family

    family = resolve_family(config.model_family, config.base_model)
    if config.blocks_to_swap and get_family(family).settings_group != "flow":
        raise ConfigError("blocks_to_swap", f"is for the transformer families (FLUX.1, Chroma, Qwen-Image, Z-Image, "
                          f"SD3.5, FLUX.2); {get_family(family).name} has no transformer blocks to swap: set it to 0.")
    return get_family(family).trainer_class()(config, run, bus, family=family)


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
        self._progress = Progress()
        self._losses: list[tuple[int, float]] = []
        self._val_losses: list[tuple[int, float]] = []
        self._log: list[str] = []
        self._last_sample: str | None = None
        self._memory: dict[str, float] = {}
        self.bus.subscribe(self._on_event)

    @classmethod
    def resume(cls, run_dir: str | Path, overrides: dict[str, Any] | None = None) -> "TrainingJob":
        """A job that continues the run in ``run_dir`` from its latest checkpoint."""
        run = RunFolder.open(run_dir)
        config = run.load_config()
        if overrides:
            config = merge(config, overrides)
        job = cls(config, run=run, resume=True)
        metrics = run.read_metrics()
        job._losses = [(int(r["step"]), float(r["loss"])) for r in metrics if "loss" in r]
        job._val_losses = [(int(r["step"]), float(r["val_loss"])) for r in metrics if "val_loss" in r]
        return job

    # --- control ---------------------------------------------------------------------------------
    def start(self) -> "TrainingJob":
        with starting(self):
            self.config.validate()
            self.config.require_paths()
            if self.run is None:
                self.run = self._create_run_folder()
            self.status = "starting"
            self._thread = threading.Thread(target=self._main, name=f"train-{self.run.name}", daemon=True)
            self._thread.start()
        return self

    def _create_run_folder(self) -> RunFolder:
        """The new run folder; a read-only or full disk (or no permission) becomes one TrainingError sentence."""
        from .disk import write_fault

        try:
            return RunFolder.create(self.config)
        except Exception as exc:
            fault = write_fault(exc, self.config.output_dir)
            if fault is None:
                raise
            raise TrainingError(fault) from None

    def stop(self) -> None:
        if self.is_running():
            self.commands.request("stop")
            self.status = "stopping"

    def save_now(self) -> None:
        self.commands.request("save")

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
            if is_main_process():
                for leftover in self.run.remove_stale_temps():  # what a killed process was writing
                    log.info("removed the leftover %s", leftover)
            self.run.write_state(status="starting", pid_started_at=time.time())
            files = self._train_fitting()
            self.files = [str(f) for f in files]
            if self.status not in FINAL_STATES:
                self.status = "finished" if files else "stopped"
        except StudioError as exc:
            self._fail(str(exc))
        except Exception as exc:  # an unexpected bug: keep the traceback in the log, show one sentence
            self._crashed(exc)
        finally:
            self._done.set()

    def _crashed(self, exc: Exception) -> None:
        from .disk import checkpoint_note, write_fault

        fault = write_fault(exc, self.run.path)
        if fault is not None:  # a disk fault outside the loop (job.json, leftovers, loading)
            log.info("%s", fault)
            self._fail(fault + checkpoint_note(self.run))
            return
        log.exception("training crashed")
        self._log.append(traceback.format_exc())
        latest = self.run.latest_checkpoint()
        where = (f"The run can be resumed from its last checkpoint ({latest[1]})" if latest else
                 "No checkpoint had been saved yet, so Resume starts it again from step 0")
        self._fail(f"Training crashed with an unexpected error: {exc.__class__.__name__}: {exc}. "
                   f"{where}; please report this with the log.")

    def _train_fitting(self) -> list[Path]:
        """``run_training``; on out-of-memory with ``auto_fit``, again with the next smaller setting, until it fits.

        Each step down is logged and stored in the run folder (``config.yaml`` gets the settings that fit,
        ``job.json`` the list of steps). A step that keeps the batch, optimizer and resolution (gradient
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
                step = next_step_down(self.config, trainer.family)
                if is_distributed():  # the other processes wait in the next all-reduce: stop them all instead
                    advice = f" Start the run again with {step.change}." if step else ""
                    raise OutOfMemoryError(f"{exc} With several GPUs auto_fit cannot step down while the run "
                                           f"goes on (the other processes would wait for this one).{advice}") from None
                if step is None:
                    raise OutOfMemoryError(f"{exc} auto_fit has already stepped down every setting it can "
                                           f"({'; '.join(steps) or 'none left'}).") from None
                steps.append(step.change)
                resume = self._restart_after_step_down(step, steps)

    def _restart_after_step_down(self, step: StepDown, steps: list[str]) -> bool:
        """Store the smaller config; True to resume from the last checkpoint, else clear the run's progress."""
        self.config = step.config
        self.config.save(self.run.config_path)
        self.run.write_state(auto_fit_steps=steps)
        resume = step.resumable and self.run.latest_checkpoint() is not None
        if not resume:
            for _, folder in self.run.list_checkpoints():
                shutil.rmtree(folder, ignore_errors=True)
            self.run.truncate_metrics(0)
            self._losses = []
        where = "resuming from the last checkpoint" if resume else "restarting from step 0"
        self.bus.log(f"Out of GPU memory: auto_fit steps down ({step.change}) and tries again, {where}.", "warning")
        return resume

    def _check_memory(self, trainer) -> None:
        """On a CUDA GPU, log the estimated peak memory, and a warning when it is above the card's memory."""
        from ..hardware import detect_gpu
        from .memory import check_fits, estimate_breakdown

        gpu = detect_gpu()
        if gpu is None:
            return
        warning = check_fits(self.config, trainer.family, gpu["memory_gb"])
        if warning:
            trainer.say(warning, "warning")
        else:
            trainer.say(f"Estimated peak GPU memory: {estimate_breakdown(self.config, trainer.family)} of the "
                        f"{gpu['memory_gb']:.1f} GB of {gpu['name']}.")

    def _fail(self, message: str) -> None:
        self.error = message
        self.status = "failed"
        try:
            self.run.write_state(status="failed", message=message)
        except OSError:
            pass
        self.bus.emit(Failed(message))

    def _on_event(self, event: Event) -> None:
        if isinstance(event, Progress):
            self._progress = event
        elif isinstance(event, Metric):
            if self._losses and self._losses[-1][0] >= event.step:  # resumed before these steps: trained again
                self._losses = [(s, v) for s, v in self._losses if s < event.step]
            self._losses.append((event.step, event.loss))
            self._memory = {k: v for k, v in event.values.items() if k.endswith("_gb")}
        elif isinstance(event, Validation):
            self._val_losses = [(s, v) for s, v in self._val_losses if s < event.step] + [(event.step, event.loss)]
        elif isinstance(event, Log):
            self._add_log(event.message)
        elif isinstance(event, State):
            if self.status not in ("stopping",) + FINAL_STATES:
                self.status = event.state
        elif isinstance(event, Sample):
            self._last_sample = event.path
        elif isinstance(event, (Finished, Stopped)):
            self.status = event.kind
            self._add_log(event.message)
        elif isinstance(event, Failed):
            self._add_log("ERROR: " + event.message)

    def _add_log(self, line: str) -> None:
        self._log.append(line)
        del self._log[:-LOG_KEEP]

    def _recommended(self) -> int | None:
        """The recommended step once the run has finished (from ``job.json``), else None."""
        if self.status != "finished" or self.run is None:
            return None
        return (self.run.read_state().get("recommended") or {}).get("step")

    # --- for the UI ------------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """Everything a view needs, in plain types."""
        p = self._progress
        return Snapshot(run=self.run_name, run_dir=str(self.run.path) if self.run else "", status=self.status,
                        step=p.step, total=p.total, it_per_s=p.it_per_s, eta=p.eta, stage=p.stage, done=p.done,
                        of=p.of, losses=list(self._losses), val_losses=list(self._val_losses),
                        recommended=self._recommended(), memory=dict(self._memory), log=list(self._log[-200:]),
                        sample=self._last_sample, error=self.error, files=list(self.files))
