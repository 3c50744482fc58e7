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

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import TrainConfig, load_config
from ..fileio import atomic_write_json

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
        ``LORA_STUDIO_RUN_DIR`` environment variable (``multi_gpu.start_multi_gpu`` does).
        """
        from .multi_gpu import ENV_RUN_DIR, broadcast_from_main, is_main_process

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
        for sub in ("logs", "checkpoints", "samples"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        config.save(run.config_path)
        run.write_state(status="created", step=0, created_at=time.time())
        return run

    @classmethod
    def open(cls, path: str | Path) -> "RunFolder":
        from ..errors import ConfigError

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
        from .multi_gpu import is_main_process

        state = self.read_state()
        if not is_main_process():
            return {**state, **changes}
        state.update(changes)
        state["updated_at"] = time.time()
        atomic_write_json(self.state_path, state)
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
        """Drop metrics beyond ``after_step`` (a resumed run repeats those steps)."""
        rows = [r for r in self.read_metrics() if r.get("step", 0) <= after_step]
        from ..fileio import atomic_write_text

        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    # --- commands from another process (multi_gpu.request_command) ---------------------------------
    def take_commands(self) -> list[str]:
        """Names of the command files (``commands/stop``, ``save``, ``sample``) present, removing them."""
        folder = self.path / "commands"
        if not folder.is_dir():
            return []
        taken = []
        for name in ("stop", "save", "sample"):
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

    def lora_files(self) -> list[Path]:
        """Exported LoRA files and checkpoint LoRA files of this run (for the Testing tab)."""
        files = sorted(self.path.glob("*.safetensors"))
        for _, d in self.list_checkpoints():
            files += sorted(d.glob("*.safetensors"))
        return files


def list_runs(output_dir: str | Path) -> list[RunFolder]:
    """Run folders under ``output_dir``, newest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    runs = [RunFolder(p) for p in root.iterdir() if (p / "config.yaml").is_file() and (p / "job.json").is_file()]
    return sorted(runs, key=lambda r: r.read_state().get("created_at", 0), reverse=True)
