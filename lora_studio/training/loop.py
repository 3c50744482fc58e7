"""The training loop shared by every model family.

A ``Trainer`` subclass knows its model (load it, add the LoRA, compute a loss, save and export LoRA files);
``run_training`` does everything else the same way for images and LLMs: the step and epoch counting,
gradient accumulation and clipping, the learning-rate schedule (diffusers/transformers ``get_scheduler``),
progress/ETA/memory events, metrics (``metrics.jsonl`` and TensorBoard), the stop/save/sample commands,
checkpoints with exact resume, and the NaN and out-of-memory guards.
"""

from __future__ import annotations

import contextlib
import math
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..config import TrainConfig
from ..errors import OutOfMemoryError, StudioError, TrainingError
from ..fileio import atomic_write
from .events import Commands, EventBus
from .multi_gpu import any_process, mean_over_processes
from .run_folder import RunFolder
from .runtime import all_finite, build_optimizer, free_memory, is_out_of_memory, make_accelerator, memory_gb
from .runtime import rng_state, set_rng_state


class Trainer(ABC):
    """What the loop needs from a model-specific trainer."""

    def __init__(self, config: TrainConfig, run: RunFolder, bus: EventBus):
        self.config = config
        self.run = run
        self.bus = bus
        self.accelerator = make_accelerator(config, say=self.say)
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
        acc = getattr(self, "accelerator", None)
        return acc is None or acc.is_main_process

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

    def step_metrics(self) -> dict[str, float]:
        """Extra numbers for this step's metrics record (e.g. tokens per second); none by default."""
        return {}

    def write_card(self, step: int, files: list[Path], tag_frequency: dict | None = None,
                   captions: list[str] | None = None, num_images: int | None = None) -> None:
        """README.md (the LoRA card) and, for images, the A1111 sidecar; a failure here only warns."""
        from ..export.card import write_card

        try:
            write_card(self.run, self.config, getattr(self, "family", "sd15"), files, tag_frequency,
                       captions=captions, steps=step, num_images=num_images)
        except Exception as exc:  # the LoRA itself is written; the card can be rewritten later
            self.say(f"The LoRA card (README.md) could not be written: {exc.__class__.__name__}: {exc}", "warning")

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for group in self.param_groups() for p in group["params"]]

    def cleanup(self) -> None:
        """Release models and caches (called at the end of every run, also on failure)."""


def _eta_text(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


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

    def __init__(self, trainer: Trainer, optimizer, scheduler):
        self.trainer, self.optimizer, self.scheduler = trainer, optimizer, scheduler

    def save(self, step: int, epoch: int, batch_in_epoch: int) -> Path:
        t = self.trainer
        run = t.run
        final = run.checkpoint_dir(step)
        tmp = final.with_name(f".{final.name}.tmp")
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        t.save_lora(tmp, f"{t.config.output_name}-step{step:06d}", step, epoch)
        state = {
            "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
            "lora": {k: v.detach().cpu() for k, v in t.trainable_state().items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "generator": t.generator.get_state(), "rng": rng_state(),
        }
        scaler = getattr(t.accelerator, "scaler", None)
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        atomic_write(tmp / "state.pt", lambda p: torch.save(state, p))
        (tmp / "done").write_text(str(step), encoding="utf-8")
        if final.exists():
            import shutil

            shutil.rmtree(final)
        tmp.rename(final)
        run.prune_checkpoints(t.config.keep_checkpoints)
        return final

    def load(self, folder: Path) -> dict[str, Any]:
        t = self.trainer
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
        t.load_trainable_state(state["lora"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        t.generator.set_state(state["generator"])
        set_rng_state(state["rng"])
        scaler = getattr(t.accelerator, "scaler", None)
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        return state


def run_training(trainer: Trainer, commands: Commands, resume: bool = False) -> list[Path]:
    """Train to the end (or until stopped). Returns the exported files ([] when stopped).

    Raises TrainingError (NaN loss, out of memory) or another StudioError with a human message.
    """
    cfg, run, bus, acc = trainer.config, trainer.run, trainer.bus, trainer.accelerator
    main = acc.is_main_process
    from transformers import get_scheduler

    try:
        from accelerate.utils import set_seed

        set_seed(cfg.seed)  # LoRA initialisation, dropout; per-step noise uses trainer.generator
        bus.emit("state", state="preparing")
        trainer.prepare()
        batches_per_epoch = len(trainer.batches(0))
        per_epoch, total, epochs = total_steps(cfg, batches_per_epoch)
        optimizer = build_optimizer(cfg, trainer.param_groups(), say=trainer.say)
        scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                  num_training_steps=total)
        prepared = acc.prepare(*trainer.models(), optimizer)
        models, optimizer = list(prepared[:-1]), prepared[-1]
        trainer.prepared_models = models
        ckpt = _Checkpointer(trainer, optimizer, scheduler)

        step, start_epoch, skip = 0, 0, 0
        if resume:
            latest = run.latest_checkpoint()
            if latest is None:
                trainer.say("No checkpoint to resume from: starting this run from step 0.", "warning")
            else:
                state = ckpt.load(latest[1])
                step, start_epoch, skip = state["step"], state["epoch"], state["batch_in_epoch"]
                if skip >= batches_per_epoch:
                    start_epoch, skip = start_epoch + 1, 0
                if main:
                    run.truncate_metrics(step)
                trainer.say(f"Resumed from checkpoint at step {step} of {total}.")

        writer = _tensorboard(run) if main else None
        world = acc.num_processes
        trainer.say(f"Training {total} steps: {batches_per_epoch} batches per epoch x {epochs} epochs, "
                    f"batch {cfg.batch_size} x accumulation {cfg.gradient_accumulation_steps} x {world} "
                    f"process(es) = effective batch {cfg.batch_size * cfg.gradient_accumulation_steps * world}.")
        if main:
            run.take_commands()  # drop stop/save requests left over from an earlier process
            run.write_state(status="training", step=step, total=total, message="", num_processes=world,
                            effective_batch=cfg.batch_size * cfg.gradient_accumulation_steps * world)
        bus.emit("state", state="training")
        bus.emit("progress", step=step, total=total, epoch=start_epoch, it_per_s=0.0, eta_s=None, elapsed_s=0.0)

        speed, started = _Speed(), time.time()
        last_good: Path | None = run.latest_checkpoint()[1] if run.latest_checkpoint() else None
        params = trainer.trainable_parameters()
        ga = cfg.gradient_accumulation_steps
        for model in models:
            model.train()

        for epoch in range(start_epoch, epochs):
            batches = trainer.batches(epoch)
            accumulated, micro = 0.0, 0
            for i in range(skip if epoch == start_epoch else 0, len(batches)):
                sync = (micro + 1 == ga) or (i == len(batches) - 1)
                ctx = _no_sync(acc, models) if (not sync and world > 1) else _null()
                with ctx:
                    loss = trainer.compute_loss(batches[i])
                    if any_process(acc, not torch.isfinite(loss.detach()).all()):  # all processes stop together
                        raise _NaNLoss(step + 1)
                    acc.backward(loss / ga)
                accumulated += float(loss.detach()) / ga
                micro += 1
                if not sync:
                    continue
                if cfg.max_grad_norm > 0:
                    acc.clip_grad_norm_(params, cfg.max_grad_norm)
                lr = scheduler.get_last_lr()[0]  # the rate this step used
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                loss_value = mean_over_processes(acc, accumulated * ga / micro)  # the loss of the whole step
                accumulated, micro = 0.0, 0

                it_s = speed.tick()
                eta = (total - step) / it_s if it_s > 0 else None
                if main and (step % cfg.log_every_steps == 0 or step == total):
                    record = {"step": step, "epoch": epoch, "loss": loss_value, "lr": lr,
                              "time": round(time.time() - started, 3), **memory_gb(acc.device),
                              **trainer.step_metrics()}
                    run.append_metrics(record)
                    if writer:
                        writer.add_scalar("loss", loss_value, step)
                        writer.add_scalar("lr", record["lr"], step)
                    bus.emit("metrics", **record)
                bus.emit("progress", step=step, total=total, epoch=epoch, it_per_s=round(it_s, 3), eta_s=eta,
                         eta=_eta_text(eta) if eta is not None else "", elapsed_s=time.time() - started)

                if main:
                    for name in run.take_commands():  # requests from another process (multi_gpu.request_command)
                        commands.request(name)
                stop = any_process(acc, commands.take("stop"))  # one decision for all processes
                done = step >= total
                periodic = cfg.save_steps and step % cfg.save_steps == 0 and not done
                if (periodic or commands.take("save") or stop) and main:
                    if not all_finite(params):
                        raise _NaNLoss(step)
                    bus.emit("state", state="saving")
                    last_good = ckpt.save(step, epoch, i + 1)
                    bus.emit("checkpoint", step=step, path=str(last_good))
                    run.write_state(step=step, last_checkpoint=str(last_good))
                    bus.emit("state", state="training")
                if main and cfg.sample_prompt and ((cfg.sample_steps and step % cfg.sample_steps == 0)
                                                   or commands.take("sample")):
                    path = trainer.render_sample(step)
                    if path:
                        bus.emit("sample", step=step, path=str(path))
                if stop:
                    acc.wait_for_everyone()
                    if main:
                        run.write_state(status="stopped", step=step, message=f"Stopped at step {step}.")
                    bus.emit("stopped", step=step, message=f"Stopped at step {step} of {total}; "
                             "press Resume (or use --resume) to continue.")
                    return []
                if done:
                    break
            if step >= total:
                break

        acc.wait_for_everyone()
        files: list[Path] = []
        if main:
            if not all_finite(params):
                raise _NaNLoss(step)
            bus.emit("state", state="exporting")
            files = trainer.export(step, epochs)
            run.write_state(status="finished", step=step, files=[str(f) for f in files],
                            message="Training finished.")
        if writer:
            writer.close()
        bus.emit("finished", files=[str(f) for f in files], message=f"Finished {step} steps.")
        return files
    except _NaNLoss as nan:
        where = (f"The last good checkpoint is kept: {last_good}." if last_good else
                 "No checkpoint had been saved yet (lower save_steps to keep more).")
        raise TrainingError(f"The loss became NaN/infinite at step {nan.step}, so training stopped. {where} "
                            "Try a lower learning_rate, mixed_precision bf16 instead of fp16, or max_grad_norm 1.")
    except StudioError:
        raise
    except Exception as exc:
        if is_out_of_memory(exc):
            free_memory()
            raise OutOfMemoryError(out_of_memory_advice(cfg, getattr(trainer, "family", None))) from None
        raise
    finally:
        trainer.cleanup()
        free_memory()


def _smaller_preset_hint(family: str, is_smaller) -> str:
    """' Try the preset X (...).' for the largest preset of the family that ``is_smaller(values)`` accepts."""
    from ..presets import list_presets

    smaller = [p for p in list_presets("sd15" if family == "sd2" else family) if is_smaller(p.values)]
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
                                or (v.get("gradient_checkpointing") and not cfg.gradient_checkpointing))
    return (f"The GPU ran out of memory (batch_size {cfg.batch_size}, resolution {cfg.resolution}, "
            f"gradient_checkpointing {cfg.gradient_checkpointing}).{hint} Or lower batch_size, turn on "
            "gradient_checkpointing, use optimizer adamw8bit, or lower the resolution. "
            "Setting auto_fit: true makes the run step down by itself."
            + (" For FLUX and Chroma, base_quantization nf4 stores the transformer in 4 bits (about 6.7 GB instead "
               "of 24 for FLUX.1)." if family in ("flux", "chroma") else ""))


class _NaNLoss(Exception):
    def __init__(self, step: int):
        self.step = step


def _no_sync(acc, models: Sequence[torch.nn.Module]) -> contextlib.ExitStack:
    """Skip the gradient all-reduce of every trained model (not only the first) while accumulating."""
    stack = contextlib.ExitStack()
    for model in models:
        stack.enter_context(acc.no_sync(model))
    return stack


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _tensorboard(run: RunFolder):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is in requirements.txt; keep training without it
        return None
    return SummaryWriter(log_dir=str(run.logs_dir))


def iter_chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
