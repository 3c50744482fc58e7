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
    p.add_argument("--steps", type=int, default=4)
    p.set_defaults(func=cmd_doctor)


class _TerminalView:
    """Prints log lines and a one-line progress bar for a job's events (main process only)."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.last_loss: float | None = None
        self.bar_shown = False

    def __call__(self, event) -> None:
        d = event.data
        if event.kind == "metrics":
            self.last_loss = d["loss"]
        elif event.kind == "progress" and d.get("total"):
            step, total = d["step"], d["total"]
            width = 30
            filled = int(width * step / max(total, 1))
            loss = f" loss {self.last_loss:.4f}" if self.last_loss is not None else ""
            speed = f" {d.get('it_per_s', 0):.2f} it/s" if d.get("it_per_s") else ""
            eta = f" ETA {d['eta']}" if d.get("eta") else ""
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {step}/{total}{loss}{speed}{eta}   ")
            self.stream.flush()
            self.bar_shown = True
        elif event.kind in ("log", "checkpoint", "sample", "finished", "stopped", "failed"):
            if self.bar_shown:
                self.stream.write("\n")
                self.bar_shown = False
            text = d.get("message") or f"{event.kind}: {d.get('path', '')}"
            prefix = {"failed": "error: ", "checkpoint": "saved checkpoint ", "sample": "sample "}.get(event.kind, "")
            if event.kind in ("checkpoint", "sample"):
                text = d["path"]
            if d.get("level") == "warning":
                prefix = "warning: "
            self.stream.write(prefix + text + "\n")
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
        job.bus.subscribe(_TerminalView())
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
    from .models.family import family_info
    from .presets import detect_gpu

    cfg = load_config(config_path, overrides=overrides)
    gpu = detect_gpu()
    if gpu is None:
        sys.stderr.write("--preset auto: no CUDA GPU detected, so no preset is applied.\n")
        return None
    name = family_info(cfg.base_model).recommended_preset(gpu["memory_gb"])
    sys.stderr.write(f"--preset auto: {gpu['name']} ({gpu['memory_gb']:.1f} GB) -> preset {name}\n")
    return name


def cmd_presets(args: argparse.Namespace) -> int:
    from .presets import detect_gpu, list_presets, recommend_preset

    gpu = detect_gpu()
    print(f"GPU: {gpu['name']} ({gpu['memory_gb']:.1f} GB)" if gpu else "GPU: none found (CUDA not available)")
    for family in ("sd15", "sdxl", "flux", "llm"):
        presets = list_presets(family)
        if not presets:
            continue
        fit = recommend_preset(gpu["memory_gb"], family) if gpu else None
        print(f"\n{family}:")
        for p in presets:
            mark = "  <- fits this GPU" if fit and fit.name == p.name else ""
            sets = ", ".join(f"{k}={v}" for k, v in p.values.items())
            print(f"  {p.name:<12} {p.description}{mark}\n               sets: {sets}")
    print("\nUse one with: python -m lora_studio train --config my.yaml --preset NAME")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    import torch

    from . import __version__

    ok = True
    print(f"LoRA Studio {__version__}, Python {sys.version.split()[0]}")
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
        losses = ", ".join(f"{loss:.3f}" for _, loss in snap["losses"])
        print(f"  tiny training OK in {time.time() - started:.1f}s; losses: {losses}")
        return True
