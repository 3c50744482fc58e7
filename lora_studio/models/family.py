"""What the model family of a base model decides: defaults, presets and the memory estimate's figures.

    info = family_info("/models/sdxl-base")     # detects the family from the files (models/loading.py)
    info.family, info.name                      # "sdxl", "SDXL"
    info.prediction_type                        # "epsilon" / "v_prediction" (from the scheduler), or None
    info.default_resolution                     # 1024
    info.presets                                # ["sdxl_12gb", "sdxl_16gb", "sdxl_24gb"]
    info.recommended_preset(gpu_memory_gb=16)   # "sdxl_16gb"

SD2.x models use the SD1.x presets (same UNet size; set the resolution to 768 for the v-prediction models).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .loading import FAMILY_NAMES, detect_family

DEFAULT_RESOLUTION = {"sd15": 512, "sd2": 768, "sdxl": 1024, "flux": 1024, "chroma": 1024}
PRESET_FAMILY = {"sd15": "sd15", "sd2": "sd15", "sdxl": "sdxl", "flux": "flux", "chroma": "flux", "llm": "llm"}


@dataclass(frozen=True)
class FamilyInfo:
    family: str
    name: str
    prediction_type: str | None = None
    default_resolution: int | None = None
    presets: list[str] = field(default_factory=list)

    def recommended_preset(self, gpu_memory_gb: float | None) -> str | None:
        from ..presets import recommend_preset

        preset = recommend_preset(gpu_memory_gb, PRESET_FAMILY.get(self.family, self.family))
        return preset.name if preset else None


def prediction_type_of(base_model: str) -> str | None:
    """The scheduler's prediction type of a local diffusers folder (None when it cannot be read)."""
    path = Path(base_model).expanduser() / "scheduler" / "scheduler_config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("prediction_type") or "epsilon"
    except (OSError, ValueError):
        return None


def family_info(base_model: str, family: str | None = None) -> FamilyInfo:
    """Detect (or take) the family of ``base_model`` and what it implies. ModelLoadError if unknown."""
    from ..presets import list_presets

    family = family if family and family != "auto" else detect_family(base_model)
    return FamilyInfo(
        family=family, name=FAMILY_NAMES.get(family, family),
        prediction_type=("flow_matching" if family in ("flux", "chroma") else
                         prediction_type_of(base_model) if family != "llm" else None),
        default_resolution=DEFAULT_RESOLUTION.get(family),
        presets=[p.name for p in list_presets(PRESET_FAMILY.get(family, family))])
