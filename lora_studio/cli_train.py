"""The ``train``, ``presets`` and ``doctor`` commands."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from .config import load_config, parse_overrides
from .errors import StudioError
from .training.events import Checkpoint, Event, Failed, Finished, Log, Metric, Progress, Sample, Stopped
from .training.events import Validation


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a LoRA from a YAML config",
                       description="Train a LoRA. Settings: preset, then the config file, then key=value overrides.")
    p.add_argument("--config", help="YAML config file (see presets/lora_default.yaml)")
    p.add_argument("--preset", help="hardware preset applied first, e.g. 12gb, 16gb, 24gb, sdxl_16gb; "
                                    "'auto' picks the one for the model's family that fits the detected GPU")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped or crashed run from its last checkpoint")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. batch_size=2")
    p.set_defaults(func=cmd_train)


def add_presets_parser(sub) -> None:
    p = sub.add_parser("presets", help="list hardware presets and the one that fits this GPU")
    p.set_defaults(func=cmd_presets)


def add_doctor_parser(sub) -> None:
    p = sub.add_parser("doctor", help="check the installation and train a few steps on a tiny model")
    p.add_argument("--steps", type=int, default=4, help="training steps on a tiny model (0: skip the training check)")
    p.set_defaults(func=cmd_doctor)


class TerminalView:
    """Prints log lines and a progress bar for a job's events (main process only).

    On a terminal the bar is redrawn in place; when standard error is not a terminal (a log file, CI, a
    process started by a GUI) it prints a plain line every ``every_percent`` percent instead.
    """

    def __init__(self, stream=None, every_percent: int = 5):
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = every_percent
        self.last_loss: float | None = None
        self.last_percent = -1
        self.bar_shown = False

    def __call__(self, event: Event) -> None:
        if isinstance(event, Metric):
            self.last_loss = event.loss
        elif isinstance(event, Progress) and event.total:
            self._progress(event)
        elif isinstance(event, (Log, Checkpoint, Sample, Finished, Stopped, Failed, Validation)):
            self._line(event)

    def _progress(self, p: Progress) -> None:
        loss = f" loss {self.last_loss:.4f}" if self.last_loss is not None else ""
        speed = f" {p.it_per_s:.2f} it/s" if p.it_per_s else ""
        eta = f" ETA {p.eta}" if p.eta else ""
        if self.tty:
            filled = int(30 * p.step / max(p.total, 1))
            self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {p.step}/{p.total}{loss}{speed}{eta}   ")
            self.bar_shown = True
        else:
            percent = 100 * p.step // max(p.total, 1)
            if percent // self.every == self.last_percent // self.every and p.step != p.total:
                return
            self.last_percent = percent
            self.stream.write(f"step {p.step}/{p.total} ({percent}%){loss}{speed}{eta}\n")
        self.stream.flush()

    def _line(self, event: Event) -> None:
        if self.bar_shown:
            self.stream.write("\n")
            self.bar_shown = False
        if isinstance(event, Checkpoint):
            text = f"saved checkpoint {event.path}"
        elif isinstance(event, Sample):
            text = f"sample {event.path}"
        elif isinstance(event, Failed):
            text = f"error: {event.message}"
        elif isinstance(event, Validation):
            best = f" (lowest {event.best_loss:.4f} at step {event.best_step})" if event.best_step is not None else ""
            text = f"validation loss {event.loss:.4f} at step {event.step}{best}"
        elif isinstance(event, Log) and event.level == "warning":
            text = f"warning: {event.message}"
        else:
            text = event.message
        self.stream.write(text + "\n")
        self.stream.flush()


def cmd_train(args: argparse.Namespace) -> int:
    from .training.job import TrainingJob
    from .training.multi_gpu import is_main_process

    overrides = parse_overrides(args.overrides)
    if args.resume:
        job = TrainingJob.resume(args.resume, overrides=overrides or None)
    else:
        if not args.config and not overrides:
            raise StudioError("Give a config file (--config my.yaml) or key=value settings; "
                              "presets/lora_default.yaml is a commented template.")
        preset = auto_preset(args.config, overrides) if args.preset == "auto" else args.preset
        job = TrainingJob(load_config(args.config, preset=preset, overrides=overrides))
    if is_main_process():
        job.bus.subscribe(TerminalView())
    job.start()
    previous = signal.getsignal(signal.SIGINT)

    def on_interrupt(signum, frame):  # first Ctrl+C: stop cleanly with a checkpoint; second: abort
        sys.stderr.write("\nStopping after this step (a checkpoint is saved). Press Ctrl+C again to abort.\n")
        job.stop()
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, on_interrupt)
    while not job.wait(0.5):
        pass
    if job.status == "failed":
        if not is_main_process():  # only the main process shows events; say why this one failed
            sys.stderr.write(f"error (process {os.environ.get('RANK', '?')}): {job.error}\n")
        return 1
    if job.status == "finished" and is_main_process():
        print(f"LoRA written to {job.run.path}")
        for f in job.files:
            print(f"  {f}")
    return 0


def auto_preset(config_path: str | None, overrides: dict) -> str | None:
    """The preset for the config's base model family that fits the detected GPU (None without a GPU)."""
    from .models.detect import family_info
    from .hardware import detect_gpu

    cfg = load_config(config_path, overrides=overrides)
    gpu = detect_gpu()
    if gpu is None:
        sys.stderr.write("--preset auto: no CUDA GPU detected, so no preset is applied.\n")
        return None
    name = family_info(cfg.base_model).recommended_preset(gpu["memory_gb"])
    sys.stderr.write(f"--preset auto: {gpu['name']} ({gpu['memory_gb']:.1f} GB) -> preset {name}\n")
    return name


def cmd_presets(args: argparse.Namespace) -> int:
    from .families import FAMILIES
    from .hardware import detect_gpu
    from .presets import list_presets, recommend_preset

    gpu = detect_gpu()
    print(f"GPU: {gpu['name']} ({gpu['memory_gb']:.1f} GB)" if gpu else "GPU: none found (CUDA not available)")
    for family in dict.fromkeys(f.preset_group for f in FAMILIES.values()):  # sd15, sdxl, flux, llm
        presets = list_presets(family)
        if not presets:
            continue
        fits = {recommend_preset(gpu["memory_gb"], family, p.variant).name for p in presets} if gpu else set()
        print(f"\n{family}:")
        for p in presets:
            mark = "  <- fits this GPU" if p.name in fits else ""
            sets = ", ".join(f"{k}={v}" for k, v in p.values.items())
            print(f"  {p.name:<18} {p.description}{mark}\n  {'':<18} sets: {sets}")
    print("\nUse one with: python -m lora_studio train --config my.yaml --preset NAME")
    return 0


def _doctor_install() -> bool:
    """The install check and how the installed versions differ from the tested ones; True when whole."""
    from .versions import LOCK, install_message, install_problems, installed_versions, lock_differences, read_lock

    problems = install_problems()
    if problems:
        print(f"PROBLEM: {install_message(problems)}")
    else:
        print("Installed packages work together.")
    if LOCK.is_file():
        diffs = [d for d in lock_differences(installed_versions(), read_lock()) if "not installed" not in d]
        print(f"Versions differ from the tested ones in {LOCK.name}: " + "; ".join(diffs) if diffs
              else f"Versions are the tested ones ({LOCK.name}).")
    return not problems


def cmd_doctor(args: argparse.Namespace) -> int:
    import torch

    from . import __version__
    from .hardware import describe_device

    print(f"LoRA Studio {__version__}, Python {sys.version.split()[0]}")
    ok = _doctor_install()
    line, warning = describe_device()
    print(f"Device: {line}")
    if warning:
        print(f"WARNING: {warning}")
    print(f"torch {torch.__version__}; CUDA available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            print(f"  GPU {i}: {props.name}, {props.total_memory / 1e9:.1f} GB, bf16: {torch.cuda.is_bf16_supported()}")
    for name in ("diffusers", "transformers", "peft", "accelerate", "gradio", "safetensors"):
        try:
            mod = __import__(name)
            print(f"{name} {mod.__version__}")
        except Exception as exc:
            ok = False
            print(f"{name}: NOT available ({exc})")
    try:
        import bitsandbytes  # noqa: F401

        print(f"bitsandbytes {bitsandbytes.__version__}" + ("" if torch.cuda.is_available() else
                                                           " (8-bit AdamW needs CUDA; AdamW is used instead)"))
    except Exception as exc:
        print(f"bitsandbytes: not usable ({exc.__class__.__name__}); 8-bit AdamW falls back to AdamW")
    if args.steps > 0:
        print(f"\nTraining {args.steps} steps on a tiny built-in model ...")
        ok = _doctor_train(args.steps) and ok
    print("All checks passed." if ok else "Some checks failed (see above).")
    return 0 if ok else 1


def _doctor_train(steps: int) -> bool:
    from .models.tiny import build_tiny_sd15, make_demo_images
    from .training.job import TrainingJob
    from .config import TrainConfig

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = TrainConfig(base_model=str(build_tiny_sd15(root / "model")),
                          train_data_dir=str(make_demo_images(root / "data", count=4)), output_dir=str(root / "out"),
                          resolution=64, max_train_steps=steps, save_steps=0, lora_rank=4, learning_rate=1e-3,
                          mixed_precision="no").validate()
        started = time.time()
        job = TrainingJob(cfg).start()
        job.wait()
        snap = job.snapshot()
        if job.status != "finished":
            print(f"  tiny training FAILED: {job.error}")
            return False
        losses = ", ".join(f"{loss:.3f}" for _, loss in snap.losses)
        print(f"  tiny training OK in {time.time() - started:.1f}s; losses: {losses}")
        return True
