"""A run is a folder. Everything needed to watch, resume or reuse a run lives in it:

    <output_dir>/<run name>/
        config.yaml        the full TrainConfig of the run
        job.json           state: status, step, total, message, output files, timestamps
        metrics.jsonl      one JSON object per logged step: {"step", "loss", "lr", ...}
        logs/              TensorBoard event files
        checkpoints/       step_000100/ ... each with the LoRA (kohya format) and the resume state
        samples/           sample images rendered during training
        <output_name>.safetensors and the other exported files, when finished

The UI rebuilds its view from this folder after a browser refresh or an app restart.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import TrainConfig, load_config
from ..errors import ConfigError
from ..fileio import atomic_write_json, atomic_write_text, is_temp_name
from .events import COMMAND_NAMES
from .multi_gpu import ENV_RUN_DIR, broadcast_from_main, is_main_process

CHECKPOINT_RE = re.compile(r"^step_(\d+)$")


@dataclass
class RunFolder:
    path: Path

    # --- creating and opening --------------------------------------------------------------------
    @classmethod
    def create(cls, config: TrainConfig) -> "RunFolder":
        """A new run folder under ``config.output_dir`` named ``<output_name>-<date>-<time>``.

        Under several processes only the main process creates it and the others receive its path, so
        all of them write into one folder. A launcher may fix the folder beforehand through the
        ``LORA_STUDIO_RUN_DIR`` environment variable (``process_job.ProcessJob`` does).
        """
        path = str(cls._create_here(config, os.environ.get(ENV_RUN_DIR)).path) if is_main_process() else None
        return cls(Path(broadcast_from_main(path)))

    @classmethod
    def _create_here(cls, config: TrainConfig, fixed: str | None = None) -> "RunFolder":
        if fixed:
            run = cls(Path(fixed))
            if run.config_path.is_file() and run.state_path.is_file():  # prepared by the launcher
                for sub in ("logs", "checkpoints", "samples"):
                    (run.path / sub).mkdir(parents=True, exist_ok=True)
                return run
            path = run.path
        else:
            root = Path(config.output_dir)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            path = root / f"{config.output_name}-{stamp}"
            n = 1
            while path.exists():
                n += 1
                path = root / f"{config.output_name}-{stamp}-{n}"
        run = cls(path)
        try:
            for sub in ("logs", "checkpoints", "samples"):
                (path / sub).mkdir(parents=True, exist_ok=True)
            config.save(run.config_path)
            run.write_state(status="created", step=0, created_at=time.time())
        except BaseException:  # a full or read-only disk: leave no half-made run folder behind
            shutil.rmtree(path, ignore_errors=True)
            raise
        return run

    @classmethod
    def open(cls, path: str | Path) -> "RunFolder":
        run = cls(Path(path))
        if not run.config_path.is_file():
            raise ConfigError("resume", f"'{path}' is not a run folder (it has no config.yaml).")
        return run

    # --- files -----------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def state_path(self) -> Path:
        return self.path / "job.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def logs_dir(self) -> Path:
        return self.path / "logs"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def samples_dir(self) -> Path:
        return self.path / "samples"

    def save_sample(self, step: int, image) -> Path:
        """``samples/step_NNNNNN.png`` for a sample image (PIL) rendered at ``step``."""
        path = self.samples_dir / f"step_{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        return path

    def load_config(self) -> TrainConfig:
        return load_config(self.config_path)

    # --- state -----------------------------------------------------------------------------------
    def read_state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def write_state(self, **changes: Any) -> dict[str, Any]:
        """Merge ``changes`` into ``job.json`` (only the main process writes it; others get the merge back)."""
        state = self.read_state()
        if not is_main_process():
            return {**state, **changes}
        state.update(changes)
        state["updated_at"] = time.time()
        try:
            atomic_write_json(self.state_path, state)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or not self.state_path.is_file():
                raise
            # A full disk has no room for a second copy: rewrite in place (the old blocks are freed first),
            # so a failed run still says why it failed.
            self.state_path.write_text(json.dumps(state, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
        return state

    # --- metrics ---------------------------------------------------------------------------------
    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        rows = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a crash
        return rows

    def truncate_metrics(self, after_step: int) -> None:
        """Keep the metrics up to ``after_step``, each step once (a resumed run repeats the later steps).

        A step found twice (left by an older file that was never trimmed) keeps its last row."""
        by_step = {r.get("step", 0): r for r in self.read_metrics() if r.get("step", 0) <= after_step}
        rows = [by_step[s] for s in sorted(by_step)]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    def remove_stale_temps(self) -> list[Path]:
        """Delete the temporary files and folders a killed process left (``.<name>.<random>.tmp``,
        ``.step_N.tmp``, ``.diffusers.tmp-*`` ...). Only call it while no process writes this run."""
        removed = []
        for folder, dirs, files in os.walk(self.path):
            for name in [d for d in dirs if is_temp_name(d)] + [f for f in files if is_temp_name(f)]:
                target = Path(folder) / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    target.unlink(missing_ok=True)
                removed.append(target)
            dirs[:] = [d for d in dirs if not is_temp_name(d)]
        return removed

    # --- commands from another process ------------------------------------------------------------
    def request_command(self, name: str) -> Path:
        """Ask the run (training in another process) to ``stop``, ``save`` or ``sample`` at its next step."""
        if name not in COMMAND_NAMES:
            raise ValueError(f"unknown command {name!r}; one of {', '.join(COMMAND_NAMES)}")
        folder = self.path / "commands"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        path.write_text(name, encoding="utf-8")
        return path

    def take_commands(self) -> list[str]:
        """Names of the command files (``commands/stop``, ``save``, ``sample``) present, removing them."""
        folder = self.path / "commands"
        if not folder.is_dir():
            return []
        taken = []
        for name in COMMAND_NAMES:
            try:
                (folder / name).unlink()
            except OSError:  # not requested (or already taken)
                continue
            taken.append(name)
        return taken

    # --- checkpoints -----------------------------------------------------------------------------
    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints_dir / f"step_{step:06d}"

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints (those with a ``done`` marker), oldest first."""
        out = []
        if self.checkpoints_dir.is_dir():
            for d in self.checkpoints_dir.iterdir():
                m = CHECKPOINT_RE.match(d.name)
                if m and (d / "done").exists():
                    out.append((int(m.group(1)), d))
        return sorted(out)

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        ckpts = self.list_checkpoints()
        return ckpts[-1] if ckpts else None

    def prune_checkpoints(self, keep: int) -> None:
        for _, d in self.list_checkpoints()[:-keep] if keep > 0 else []:
            shutil.rmtree(d, ignore_errors=True)


def list_runs(output_dir: str | Path) -> list[RunFolder]:
    """Run folders under ``output_dir``, newest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    runs = [RunFolder(p) for p in root.iterdir() if (p / "config.yaml").is_file() and (p / "job.json").is_file()]
    return sorted(runs, key=lambda r: r.read_state().get("created_at", 0), reverse=True)
