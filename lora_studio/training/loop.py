"""The training loop shared by every model family.

A ``Trainer`` subclass knows its model (load it, add the LoRA, compute a loss, save and export LoRA files);
``run_training`` does everything else the same way for images and LLMs: the step and epoch counting,
gradient accumulation and clipping, the optimizer (``optimizers.py``) and learning-rate schedule
(diffusers/transformers ``get_scheduler``), the EMA of the LoRA weights (``ema.py``), the validation loss and the
recommended checkpoint (``validation.py``), progress/ETA/memory events, metrics (``metrics.jsonl`` and
TensorBoard), the stop/save/sample commands, checkpoints with exact resume, and the NaN and out-of-memory guards.

Saving, sampling, validation and the export see the weights that ship (``_Loop.shipped_weights``): the EMA
average when ``ema_decay`` is set, else a schedule-free optimizer's evaluation weights, else the trained ones.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import TrainConfig
from ..errors import OutOfMemoryError, StudioError, TrainingError
from ..families import get_family
from ..fileio import atomic_write
from .disk import check_free_space, checkpoint_note, run_bytes, write_fault
from .ema import EMA
from .events import Checkpoint, Commands, EventBus, Finished, Metric, Progress, Sample, Stopped, Validation
from .multi_gpu import any_process, mean_over_processes
from .optimizers import build_optimizer, eval_weights, scheduler_settings, train_mode
from .run_folder import RunFolder
from .runtime import all_finite, free_memory, is_out_of_memory, make_accelerator, memory_gb
from .runtime import rng_state, set_rng_state
from .validation import ValidationHistory, overfit_message, recommendation_text


class Trainer(ABC):
    """What the loop needs from a model-specific trainer."""

    def __init__(self, config: TrainConfig, run: RunFolder, bus: EventBus, family: str):
        self.config = config
        self.run = run
        self.bus = bus
        self.family = family  # the id of its entry in the family registry (families.py)
        self.accelerator = None
        self.accelerator = make_accelerator(config, say=self.say)
        self.prepared_models: list[torch.nn.Module] = []  # models() as accelerate prepared them (the loop sets it)
        # Noise, timesteps and other per-step randomness come from this generator, saved in checkpoints.
        self.generator = torch.Generator(device="cpu").manual_seed(config.seed)

    def say(self, message: str, level: str = "info") -> None:
        if self.accelerator_ready_and_main():
            self.bus.log(message, level)

    def warn_if_little_effect(self, effect: float, limit: float, what: str) -> None:
        """After the export check: a LoRA that changes ``what`` by at most ``limit`` has learned very little."""
        if effect <= limit:
            self.say(f"The LoRA changes {what} by only {effect:.2g}: it has learned very little. "
                     "Train longer or raise learning_rate.", "warning")

    def accelerator_ready_and_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    # --- to implement --------------------------------------------------------------------------------
    @abstractmethod
    def prepare(self) -> None:
        """Load the model, add the LoRA (and ``init_lora``), read and cache the data."""

    @abstractmethod
    def batches(self, epoch: int) -> Sequence[Any]:
        """This process's batches for ``epoch``, in a deterministic order given the seed and epoch."""

    @abstractmethod
    def models(self) -> list[torch.nn.Module]:
        """The modules that carry trainable LoRA weights (given to ``accelerator.prepare``)."""

    @abstractmethod
    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups (each may set its own ``lr``)."""

    @abstractmethod
    def compute_loss(self, batch: Any) -> torch.Tensor:
        """The training loss of one batch (a scalar)."""

    @abstractmethod
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The LoRA weights in full precision (what a checkpoint must restore exactly)."""

    @abstractmethod
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Put weights from ``trainable_state`` back."""

    @abstractmethod
    def save_lora(self, folder: Path, name: str, step: int, epoch: int) -> list[Path]:
        """Write the LoRA in the user-facing format (kohya for images, PEFT for LLMs) into ``folder``."""

    @abstractmethod
    def export(self, step: int, epoch: int) -> list[Path]:
        """Write the final files into the run folder (and check they reload); return their paths."""

    def render_sample(self, step: int) -> Path | None:
        """Render a sample for ``config.sample_prompt`` into ``run.samples_dir``; None if not supported."""
        return None

    def validation_batches(self) -> Sequence[Any]:
        """The held-out batches of the validation loss, the same ones in the same order every time (none by
        default: the run has no validation)."""
        return []

    def validation_loss(self, batch: Any) -> torch.Tensor:
        """Per-sample losses of one held-out batch, computed without any training randomness (fixed noise and
        timesteps), on the models as the loop hands them over (eval mode, no gradients, shipped weights)."""
        raise NotImplementedError(f"{type(self).__name__} has no validation loss")

    def export_extra_bytes(self) -> int:
        """Bytes the export writes besides the LoRA files (the free-space check adds them); none by default."""
        return 0

    def step_metrics(self) -> dict[str, float]:
        """Extra numbers for this step's metrics record (e.g. tokens per second); none by default."""
        return {}

    def write_card(self, step: int, files: list[Path], tag_frequency: dict | None = None,
                   captions: list[str] | None = None, num_images: int | None = None) -> None:
        """README.md (the LoRA card) and, for images, the A1111 sidecar; a failure here only warns."""
        from ..export.card import write_card

        try:
            write_card(self.run, self.config, self.family, files, tag_frequency,
                       captions=captions, steps=step, num_images=num_images)
        except Exception as exc:  # the LoRA itself is written; the card can be rewritten later
            self.say(f"The LoRA card (README.md) could not be written: {exc.__class__.__name__}: {exc}", "warning")

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for group in self.param_groups() for p in group["params"]]

    def cleanup(self) -> None:  # noqa: B027 - optional for a trainer
        """Release models and caches (called at the end of every run, also on failure)."""


class _Speed:
    """Steps per second over a sliding window, for a steady ETA."""

    def __init__(self, window: int = 20):
        self.times: list[float] = []
        self.window = window

    def tick(self) -> float:
        self.times.append(time.perf_counter())
        self.times = self.times[-self.window:]
        if len(self.times) < 2:
            return 0.0
        return (len(self.times) - 1) / max(self.times[-1] - self.times[0], 1e-9)


def total_steps(config: TrainConfig, batches_per_epoch: int) -> tuple[int, int, int]:
    """(optimizer steps per epoch, total steps, epochs) for this config."""
    per_epoch = max(math.ceil(batches_per_epoch / config.gradient_accumulation_steps), 1)
    if config.max_train_steps:
        total = config.max_train_steps
        epochs = math.ceil(total / per_epoch)
    else:
        epochs = config.epochs
        total = epochs * per_epoch
    return per_epoch, total, epochs


class _Checkpointer:
    """Writes ``checkpoints/step_N/`` atomically: the LoRA file, the resume state, then a ``done`` marker."""

    def __init__(self, loop: "_Loop"):
        self.loop = loop
        self.trainer = loop.t

    def save(self, step: int, epoch: int, batch_in_epoch: int) -> Path:
        t = self.trainer
        run = t.run
        final = run.checkpoint_dir(step)
        tmp = final.with_name(f".{final.name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        try:
            self._write(tmp, step, epoch, batch_in_epoch)
        except BaseException:  # a full disk: give back what the half-written checkpoint took
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        best = self.loop.best_point()
        run.prune_checkpoints(t.config.keep_checkpoints, protect={best.step} if best else set())
        return final

    def _write(self, tmp: Path, step: int, epoch: int, batch_in_epoch: int) -> None:
        t, loop = self.trainer, self.loop
        state = {
            "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
            "lora": {k: v.detach().cpu().clone() for k, v in t.trainable_state().items()},
            "optimizer": loop.optimizer.state_dict(), "scheduler": loop.scheduler.state_dict(),
            "generator": t.generator.get_state(), "rng": rng_state(), "validation": loop.history.state_dict(),
        }
        if loop.ema is not None:
            state["ema"] = loop.ema.state_dict()
        scaler = getattr(t.accelerator, "scaler", None)
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        with loop.shipped_weights():  # the file a user tests is what would ship (EMA / schedule-free weights)
            t.save_lora(tmp, f"{t.config.output_name}-step{step:06d}", step, epoch)
        atomic_write(tmp / "state.pt", lambda p: torch.save(state, p))
        (tmp / "done").write_text(str(step), encoding="utf-8")

    def load(self, folder: Path) -> dict[str, Any]:
        t, loop = self.trainer, self.loop
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
        t.load_trainable_state(state["lora"])
        loop.optimizer.load_state_dict(state["optimizer"])
        loop.scheduler.load_state_dict(state["scheduler"])
        t.generator.set_state(state["generator"])
        set_rng_state(state["rng"])
        loop.history.load_state_dict(state.get("validation", {}))
        if loop.ema is not None:
            if "ema" in state:
                loop.ema.load_state_dict(state["ema"])
            else:
                t.say("This checkpoint was saved without ema_decay: the average starts from the resumed weights.",
                      "warning")
                loop.ema = EMA(loop.params, loop.cfg.ema_decay)
        scaler = getattr(t.accelerator, "scaler", None)
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        return state


def run_training(trainer: Trainer, commands: Commands, resume: bool = False) -> list[Path]:
    """Train to the end (or until stopped). Returns the exported files ([] when stopped).

    Raises TrainingError (NaN loss, out of memory) or another StudioError with a human message.
    """
    loop = _Loop(trainer, commands)
    try:
        loop.prepare(resume)
        if not loop.train():
            return []
        return loop.finish()
    except _NaNLoss as nan:
        where = (f"The last good checkpoint is kept: {loop.last_good}." if loop.last_good else
                 "No checkpoint had been saved yet (lower save_steps to keep more).")
        raise TrainingError(f"The loss became NaN/infinite at step {nan.step}, so training stopped. {where} Try a "
                            "lower learning_rate, mixed_precision bf16 instead of fp16, or max_grad_norm 1.") from None
    except StudioError:
        raise
    except Exception as exc:
        if is_out_of_memory(exc):
            free_memory()
            raise OutOfMemoryError(out_of_memory_advice(trainer.config, trainer.family)) from None
        fault = write_fault(exc, trainer.run.path, loop.need)
        if fault is not None:
            raise TrainingError(fault + checkpoint_note(trainer.run)) from None
        raise
    finally:
        if loop.writer is not None:  # also after a failure: what TensorBoard got so far is flushed to disk
            try:
                loop.writer.close()
            except Exception as exc:  # a full disk: the run's own error says so already
                trainer.say(f"TensorBoard logs could not be closed: {exc}", "warning")
        trainer.cleanup()
        free_memory()


class _Loop:
    """The state of one run of the loop: what ``run_training`` prepares, steps through and finishes."""

    def __init__(self, trainer: Trainer, commands: Commands):
        self.t, self.commands = trainer, commands
        self.cfg, self.run, self.bus, self.acc = trainer.config, trainer.run, trainer.bus, trainer.accelerator
        self.main = self.acc.is_main_process
        self.step, self.start_epoch, self.skip = 0, 0, 0
        self.last_good: Path | None = None
        self.writer = None
        self.need: int | None = None  # bytes the run writes (the free-space check's estimate)
        self.ema: EMA | None = None
        self.history = ValidationHistory()
        self.val_batches: list[Any] = []

    # --- before the first step ---------------------------------------------------------------------
    def prepare(self, resume: bool) -> None:
        from accelerate.utils import set_seed
        from transformers import get_scheduler

        t, cfg, acc = self.t, self.cfg, self.acc
        set_seed(cfg.seed)  # LoRA initialisation, dropout; per-step noise uses trainer.generator
        self.bus.state("preparing")
        t.prepare()
        self.batches_per_epoch = len(t.batches(0))
        _, self.total, self.epochs = total_steps(cfg, self.batches_per_epoch)
        optimizer = build_optimizer(cfg, t.param_groups(), say=t.say)
        schedule, warmup = scheduler_settings(cfg)
        self.scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup, num_training_steps=self.total)
        prepared = acc.prepare(*t.models(), optimizer)
        self.models, self.optimizer = list(prepared[:-1]), prepared[-1]
        t.prepared_models = self.models
        train_mode(self.optimizer)
        self.params = t.trainable_parameters()
        self.ema = EMA(self.params, cfg.ema_decay) if cfg.uses_ema else None
        self.val_batches = list(t.validation_batches()) if cfg.has_validation else []
        self.ckpt = _Checkpointer(self)
        self.need = _check_disk_space(t, self.total)
        if resume:
            self._resume()
        self.last_good = self.run.latest_checkpoint()[1] if self.run.latest_checkpoint() else None
        self.writer = _tensorboard(self.run, self.step) if self.main else None
        self._announce()

    def _resume(self) -> None:
        latest = self.run.latest_checkpoint()
        if latest is None:
            self.t.say("No checkpoint to resume from: starting this run from step 0.", "warning")
            if self.main:
                self.run.truncate_metrics(0)  # the steps are trained again: no row may stay twice
            return
        state = self.ckpt.load(latest[1])
        self.step, self.start_epoch, self.skip = state["step"], state["epoch"], state["batch_in_epoch"]
        if self.skip >= self.batches_per_epoch:
            self.start_epoch, self.skip = self.start_epoch + 1, 0
        if self.main:
            self.run.truncate_metrics(self.step)
        self.t.say(f"Resumed from checkpoint at step {self.step} of {self.total}.")

    def _announce(self) -> None:
        cfg, world = self.cfg, self.acc.num_processes
        effective = cfg.batch_size * cfg.gradient_accumulation_steps * world
        self.t.say(f"Training {self.total} steps: {self.batches_per_epoch} batches per epoch x {self.epochs} epochs, "
                   f"batch {cfg.batch_size} x accumulation {cfg.gradient_accumulation_steps} x {world} "
                   f"process(es) = effective batch {effective}.")
        if self.main:
            self.run.take_commands()  # drop stop/save requests left over from an earlier process
            self.run.write_state(status="training", step=self.step, total=self.total, message="",
                                 num_processes=world, effective_batch=effective)
        self.bus.state("training")
        self.bus.emit(Progress(step=self.step, total=self.total, epoch=self.start_epoch))

    # --- the steps ---------------------------------------------------------------------------------
    def train(self) -> bool:
        """Step to the end; False when stopped by a command."""
        cfg, acc, t = self.cfg, self.acc, self.t
        self.speed, self.started = _Speed(), time.time()
        ga, world = cfg.gradient_accumulation_steps, acc.num_processes
        for model in self.models:
            model.train()
        for epoch in range(self.start_epoch, self.epochs):
            batches = t.batches(epoch)
            accumulated, micro = 0.0, 0
            for i in range(self.skip if epoch == self.start_epoch else 0, len(batches)):
                sync = (micro + 1 == ga) or (i == len(batches) - 1)
                with _no_sync(acc, self.models) if (not sync and world > 1) else contextlib.nullcontext():
                    loss = t.compute_loss(batches[i])
                    if any_process(acc, not torch.isfinite(loss.detach()).all()):  # all processes stop together
                        raise _NaNLoss(self.step + 1)
                    acc.backward(loss / ga)
                accumulated += float(loss.detach()) / ga
                micro += 1
                if not sync:
                    continue
                self._optimizer_step()
                loss_value = mean_over_processes(acc, accumulated * ga / micro)  # the loss of the whole step
                accumulated, micro = 0.0, 0
                if not self._after_step(loss_value, epoch, i + 1):
                    return False
                if self.step >= self.total:
                    return True
        return True

    def _optimizer_step(self) -> None:
        if self.cfg.max_grad_norm > 0:
            self.acc.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.lr = self.scheduler.get_last_lr()[0]  # the rate this step used
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.params)
        self.step += 1

    @contextlib.contextmanager
    def shipped_weights(self):
        """The weights that ship in the model while inside (EMA, or schedule-free's x); the trained ones after."""
        if self.ema is not None:
            with self.ema.applied(self.params):
                yield
        else:
            with eval_weights(self.optimizer):
                yield

    def _after_step(self, loss: float, epoch: int, batches_done: int) -> bool:
        """Validation, metrics, progress, commands, checkpoint and sample after an optimizer step; False when
        stopping."""
        cfg, step = self.cfg, self.step
        it_s = self.speed.tick()
        eta = (self.total - step) / it_s if it_s > 0 else None
        self.history.add_training_loss(loss)
        logged = self.main and (step % cfg.log_every_steps == 0 or step == self.total)
        metric = self._metric(loss, epoch) if logged else None
        self.bus.emit(Progress(step=step, total=self.total, epoch=epoch, it_per_s=round(it_s, 3), eta_s=eta,
                               elapsed_s=time.time() - self.started))
        if self.main:
            for name in self.run.take_commands():  # requests from another process (RunFolder.request_command)
                self.commands.request(name)
        stop = any_process(self.acc, self.commands.take("stop"))  # one decision for all processes
        periodic = cfg.save_steps and step % cfg.save_steps == 0 and step < self.total
        save = bool(periodic or self.commands.take("save") or stop)
        every = cfg.validation_every_steps
        val = self._validate(save) if (save or step == self.total or (every and step % every == 0)) else None
        if self.main and (metric is not None or val is not None):
            self._record(metric or self._metric(loss, epoch), val)
        if save and self.main:
            self._save_checkpoint(epoch, batches_done)
        if self.main and cfg.sample_prompt and ((cfg.sample_steps and step % cfg.sample_steps == 0)
                                                or self.commands.take("sample")):
            with self.shipped_weights():
                path = self.t.render_sample(step)
            if path:
                self.bus.emit(Sample(step, str(path)))
        if stop:
            self.acc.wait_for_everyone()
            if self.main:
                self.run.write_state(status="stopped", step=step, message=f"Stopped at step {step}.")
            self.bus.emit(Stopped(step, f"Stopped at step {step} of {self.total}; press Resume (or use --resume) "
                                        "to continue."))
        return not stop

    def _validate(self, saving: bool) -> float | None:
        """The validation loss of the shipped weights (main process only: no collective operations), its event,
        and the overfitting warning; None when the run has no validation data."""
        if not self.val_batches or not self.main:
            return None
        losses = []
        for model in self.models:
            model.eval()
        try:
            with self.shipped_weights(), torch.no_grad():
                for batch in self.val_batches:
                    losses.append(self.t.validation_loss(batch).detach().float().cpu().reshape(-1))
        finally:
            for model in self.models:
                model.train()
        point = self.history.add(self.step, float(torch.cat(losses).mean()))
        best = self.best_point(extra={self.step} if saving or self.step == self.total else set())
        overfit = self.history.overfitting()
        self.bus.emit(Validation(point.step, point.loss, best.step if best else None, best.loss if best else None,
                                 overfit))
        if overfit and not self.history.warned:
            self.history.warned = True
            self.t.say(overfit_message(self.history), "warning")
        return point.loss

    def best_point(self, extra: set[int] | None = None):
        """The evaluated step with a LoRA file (a checkpoint, or ``extra`` steps) of lowest validation loss."""
        steps = {s for s, _ in self.run.list_checkpoints()} | (extra or set())
        return self.history.best(steps)

    def _metric(self, loss: float, epoch: int) -> Metric:
        """This step's metric, emitted at once (the progress bar and the live curve show it)."""
        values = {"epoch": epoch, "time": round(time.time() - self.started, 3), **memory_gb(self.acc.device),
                  **self.t.step_metrics()}
        return self.bus.emit(Metric(self.step, loss, self.lr, values))

    def _record(self, metric: Metric, val_loss: float | None) -> None:
        """The step's row in ``metrics.jsonl`` and TensorBoard, with its validation loss when one was measured."""
        row = metric.record()
        if val_loss is not None:
            row["val_loss"] = val_loss
        self.run.append_metrics(row)
        if self.writer:
            self.writer.add_scalar("loss", metric.loss, self.step)
            self.writer.add_scalar("lr", metric.lr, self.step)
            if val_loss is not None:
                self.writer.add_scalar("val_loss", val_loss, self.step)

    def _save_checkpoint(self, epoch: int, batches_done: int) -> None:
        if not all_finite(self.params):
            raise _NaNLoss(self.step)
        self.bus.state("saving")
        self.last_good = self.ckpt.save(self.step, epoch, batches_done)
        self.bus.emit(Checkpoint(self.step, str(self.last_good)))
        self.run.write_state(step=self.step, last_checkpoint=str(self.last_good))
        self.bus.state("training")

    # --- after the last step -------------------------------------------------------------------------
    def finish(self) -> list[Path]:
        self.acc.wait_for_everyone()
        files: list[Path] = []
        note = ""
        if self.main:
            if not all_finite(self.params):
                raise _NaNLoss(self.step)
            note = self._recommend()
            self.bus.state("exporting")
            with self.shipped_weights():
                files = self.t.export(self.step, self.epochs)
            if self.ema is not None and self.cfg.ema_save_raw:  # the trained weights, outside the average
                files += self.t.save_lora(self.run.path, f"{self.cfg.output_name}-raw", self.step, self.epochs)
            self.run.write_state(status="finished", step=self.step, files=[str(f) for f in files],
                                 message="Training finished.")
        self.bus.emit(Finished([str(f) for f in files], f"Finished {self.step} steps.{note}"))
        return files

    def _recommend(self) -> str:
        """Name the saved LoRA with the lowest validation loss (``job.json``: ``recommended``); " <sentence>"."""
        best = self.best_point(extra={self.step})
        if best is None:
            return ""
        folder = None if best.step == self.step else self.run.checkpoint_dir(best.step)
        self.run.write_state(recommended={"step": best.step, "val_loss": best.loss, "final": folder is None,
                                          "checkpoint": str(folder) if folder else None})
        text = recommendation_text(best, self.step)
        self.t.say(text)
        if self.history.warned:
            self.t.say("The validation loss rose while the training loss fell during this run (overfitting); "
                       "compare the recommended checkpoint with the final LoRA in the Testing tab.", "warning")
        return " " + text


def _check_disk_space(trainer: Trainer, total: int) -> int:
    """Refuse to train when the run's disk cannot hold its checkpoints and exported files (the main process
    decides, all processes stop together); returns the estimate."""
    params = trainer.trainable_parameters()
    count = sum(p.numel() for p in params)
    size = max((p.element_size() for p in params), default=4)
    need, parts = run_bytes(trainer.config, count, size, total, getattr(trainer, "resolution", None),
                            trainer.export_extra_bytes())
    short = None
    if trainer.accelerator.is_main_process:
        try:
            check_free_space(trainer.run.path, need, parts)
        except TrainingError as exc:
            short = exc
    if any_process(trainer.accelerator, short is not None):
        raise short or TrainingError("The main process found too little free disk space for this run; see its log.")
    return need


def _smaller_preset_hint(family: str, is_smaller, base_model: str = "") -> str:
    """' Try the preset X (...).' for the largest preset of the family (and the base model's variant) that
    ``is_smaller(values)`` accepts."""
    from ..presets import list_presets

    entry = get_family(family)
    variant = entry.variant_of(base_model)
    smaller = [p for p in list_presets(entry.preset_group) if p.variant == variant and is_smaller(p.values)]
    return f" Try the preset '{smaller[-1].name}' ({smaller[-1].description})." if smaller else ""


def out_of_memory_advice(cfg: TrainConfig, family: str | None = None) -> str:
    """The message for CUDA out-of-memory: what to change, naming the next smaller preset."""
    family = family or (cfg.model_family if cfg.model_family != "auto" else "sd15")
    if family == "llm":
        hint = _smaller_preset_hint(family, lambda v: v.get("max_seq_length", 10**9) < cfg.max_seq_length
                                    or (v.get("load_in_4bit") and not cfg.load_in_4bit))
        return (f"The GPU ran out of memory (batch_size {cfg.batch_size}, max_seq_length {cfg.max_seq_length}, "
                f"load_in_4bit {cfg.load_in_4bit}, gradient_checkpointing {cfg.gradient_checkpointing}).{hint} "
                "Or lower batch_size (raise gradient_accumulation_steps to keep the effective batch), lower "
                "max_seq_length, turn on gradient_checkpointing, or set load_in_4bit: true (QLoRA).")
    hint = _smaller_preset_hint(family, lambda v: v.get("batch_size", 99) < cfg.batch_size
                                or (v.get("gradient_checkpointing") and not cfg.gradient_checkpointing)
                                or v.get("blocks_to_swap", 0) > cfg.blocks_to_swap, cfg.base_model)
    return (f"The GPU ran out of memory (batch_size {cfg.batch_size}, resolution {cfg.resolution}, "
            f"gradient_checkpointing {cfg.gradient_checkpointing}).{hint} Or lower batch_size, turn on "
            "gradient_checkpointing, use optimizer adamw8bit, or lower the resolution. "
            "Setting auto_fit: true makes the run step down by itself."
            + (" For FLUX and Chroma, base_quantization nf4 stores the transformer in 4 bits (about 6.7 GB instead "
               "of 24 for FLUX.1); with base_quantization fp8, a larger blocks_to_swap keeps more of the transformer "
               f"in CPU memory (now {cfg.blocks_to_swap})." if get_family(family).settings_group == "flow" else ""))


class _NaNLoss(Exception):
    def __init__(self, step: int):
        self.step = step


def _no_sync(acc, models: Sequence[torch.nn.Module]) -> contextlib.ExitStack:
    """Skip the gradient all-reduce of every trained model (not only the first) while accumulating."""
    stack = contextlib.ExitStack()
    for model in models:
        stack.enter_context(acc.no_sync(model))
    return stack


def _tensorboard(run: RunFolder, step: int = 0):
    """The run's TensorBoard writer. When the logs already hold events (a resumed or restarted run), the
    steps after ``step`` are purged (``purge_step``), so TensorBoard shows each step once, not doubled curves."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is in requirements.txt; keep training without it
        return None
    earlier = run.logs_dir.is_dir() and any(run.logs_dir.glob("events.out.tfevents.*"))
    return SummaryWriter(log_dir=str(run.logs_dir), purge_step=step + 1 if earlier else None)
