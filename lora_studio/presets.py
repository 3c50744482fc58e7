"""Hardware presets: small partial configs in ``presets/*.yaml``, and picking one for the detected GPU.

A preset file sets only a few keys (batch size, gradient checkpointing, precision, optimizer, caching,
resolution) plus a ``preset_info`` block (family, GPU memory in GB, one-line description, and for a family whose
models differ in size the ``variant`` it is for, such as FLUX.2 ``dev``) that is not a config key. Presets are
applied first; the config file and command-line overrides win over them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .yaml_files import read_yaml_mapping

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"
TEMPLATE_NAME = "lora_default"


@dataclass(frozen=True)
class Preset:
    name: str
    family: str
    vram_gb: float
    description: str
    values: dict[str, Any]
    variant: str = ""  # which of the family's models (``Family.variant_of``); "" the family's first


def _read(path: Path) -> Preset:
    data = read_yaml_mapping(path)
    info = data.pop("preset_info", {}) or {}
    return Preset(name=path.stem, family=str(info.get("family", "sd15")), vram_gb=float(info.get("vram_gb", 0)),
                  description=str(info.get("description", "")), values=data, variant=str(info.get("variant", "")))


def list_presets(family: str | None = None) -> list[Preset]:
    """All hardware presets (the template excluded), smallest memory first; optionally of one family."""
    presets = [_read(p) for p in sorted(PRESET_DIR.glob("*.yaml")) if p.stem != TEMPLATE_NAME]
    if family and family != "auto":
        presets = [p for p in presets if p.family == family]
    return sorted(presets, key=lambda p: (p.family, p.variant, p.vram_gb))


def get_preset(name: str) -> Preset:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return _read(path)
    candidate = PRESET_DIR / f"{name}.yaml"
    if not candidate.is_file() or name == TEMPLATE_NAME:
        known = ", ".join(p.name for p in list_presets())
        raise ConfigError("preset", f"'{name}' is not a preset; known presets: {known}.")
    return _read(candidate)


def load_preset(name: str) -> dict[str, Any]:
    """The config keys a preset sets."""
    return dict(get_preset(name).values)


def recommend_preset(memory_gb: float | None, family: str = "sd15", variant: str = "") -> Preset | None:
    """The largest preset of ``family`` (and its ``variant``: FLUX.2 dev) that fits ``memory_gb`` (cards report a
    little under their label)."""
    if memory_gb is None:
        return None
    presets = [p for p in list_presets(family) if p.variant == variant]
    fitting = [p for p in presets if p.vram_gb * 0.93 <= memory_gb]
    if fitting:
        return fitting[-1]
    return presets[0] if presets else None


def next_smaller_preset(name: str) -> Preset | None:
    """The preset of the same family and variant with the next smaller memory budget, if any."""
    current = get_preset(name)
    smaller = [p for p in list_presets(current.family)
               if p.variant == current.variant and p.vram_gb < current.vram_gb]
    return smaller[-1] if smaller else None
