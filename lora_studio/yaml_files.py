"""Reading YAML files that hold ``key: value`` settings (configs and presets), with errors that name the file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


def read_yaml_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("config", f"file '{p}' does not exist.")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError("config", f"'{p}' is not a text file (it is not UTF-8); give a YAML file such as "
                                    "presets/lora_default.yaml.") from None
    except OSError as exc:
        raise ConfigError("config", f"'{p}' cannot be read: {exc.strerror or exc}.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError("config", f"'{p}' is not valid YAML{where}: {getattr(exc, 'problem', exc)}.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"'{p}' must hold 'key: value' lines, not a {type(data).__name__}.")
    return data
