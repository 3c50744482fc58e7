"""What every tab shares: the outputs folder and its sub-folders, the path policy, the demo assets.

    outputs/                 (``--outputs``; the only folder the server hands files out from)
        uploads/             images uploaded in the Dataset tab, one folder per upload
        datasets/            prepared working copies of datasets
        runs/                training runs (one folder each, see training/run_folder.py)
        grids/               strength grids rendered in the Testing tab
        configs/             YAML files written by "Show YAML and command"
        demo/                the tiny model, captioners and images of ``--demo``
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .security import PathPolicy

if TYPE_CHECKING:
    from .demo import DemoAssets

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
MODEL_SUFFIXES = (".safetensors", ".ckpt")


@dataclass
class StudioContext:
    """Folders and settings the app was started with."""

    outputs: Path
    models_dir: Path = PROJECT_ROOT / "models"
    shared: bool = False
    demo: "DemoAssets | None" = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.outputs = Path(self.outputs).expanduser().resolve()
        self.models_dir = Path(self.models_dir).expanduser().resolve()
        for sub in (self.uploads, self.datasets_dir, self.runs_dir, self.grids_dir, self.configs_dir):
            sub.mkdir(parents=True, exist_ok=True)
        self.policy = PathPolicy(roots=[self.outputs, self.models_dir], restricted=self.shared)

    # --- folders ---------------------------------------------------------------------------------
    @property
    def uploads(self) -> Path:
        return self.outputs / "uploads"

    @property
    def datasets_dir(self) -> Path:
        return self.outputs / "datasets"

    @property
    def runs_dir(self) -> Path:
        return self.outputs / "runs"

    @property
    def grids_dir(self) -> Path:
        return self.outputs / "grids"

    @property
    def configs_dir(self) -> Path:
        return self.outputs / "configs"

    def served_paths(self) -> list[str]:
        """``allowed_paths`` for launch: only the outputs folder (uploads live inside it)."""
        return [str(self.outputs)]

    # --- models ----------------------------------------------------------------------------------
    def model_choices(self) -> list[str]:
        """Base models offered in the dropdown: the demo's models and what is in the ``models/`` folder."""
        found: list[str] = []
        if self.demo is not None:
            found.extend(str(p) for p in self.demo.model_paths())
        if self.models_dir.is_dir():
            for p in sorted(self.models_dir.iterdir()):
                if p.name.startswith("."):
                    continue
                if p.is_dir() and ((p / "model_index.json").exists() or (p / "config.json").exists()):
                    found.append(str(p))
                elif p.is_file() and p.suffix.lower() in MODEL_SUFFIXES:
                    found.append(str(p))
        return found
