"""What the app may read and hand out: typed-path checks, the share-link login, the served folders.

- Folder and file paths typed in the UI must exist and be readable. When the app is shared (``--share``
  or a non-local ``--host``), they must also lie under the allowed roots (the outputs folder, which holds
  the uploads, and the ``models/`` folder), so a visitor cannot point the app at the rest of the disk.
- The server hands out files only from the outputs folder (``allowed_paths``); everything else answers 403.
- A shared app always has a login: without ``--auth`` a password is generated and printed.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import StudioError

if TYPE_CHECKING:
    from ..config import TrainConfig

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
DEFAULT_USER = "studio"
MAX_UPLOAD = "500mb"


class PathError(StudioError):
    """A path typed in the UI cannot be used (missing, unreadable, or outside the allowed folders)."""


@dataclass
class PathPolicy:
    """Checks typed paths. ``restricted`` is on when the app is reachable by others (shared)."""

    roots: list[Path] = field(default_factory=list)
    restricted: bool = False

    def __post_init__(self) -> None:
        self.roots = [Path(r).expanduser().resolve() for r in self.roots]

    def allows(self, path: str | os.PathLike) -> bool:
        """True when ``path`` may be used (anything locally; under a root when restricted)."""
        if not self.restricted:
            return True
        resolved = Path(path).expanduser().resolve()
        return any(resolved == r or r in resolved.parents for r in self.roots)

    def _check_allowed(self, p: Path, what: str) -> None:
        if not self.allows(p):
            where = ", ".join(str(r) for r in self.roots) or "none"
            raise PathError(f"The {what} '{p}' is outside the folders this shared app may use ({where}). "
                            "Upload the files instead, or put them in one of those folders.")

    def folder(self, path: str | os.PathLike | None, what: str = "folder", create: bool = False) -> Path:
        """The checked folder: it exists (or is created when ``create``), is readable, and is allowed."""
        text = str(path or "").strip().strip('"').strip("'")
        if not text:
            raise PathError(f"No {what} given; type its path or use the upload box.")
        p = Path(text).expanduser()
        self._check_allowed(p, what)
        if create and not p.exists():
            try:
                p.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise PathError(f"The {what} '{p}' cannot be created: {exc.strerror or exc}.") from None
        if not p.exists():
            raise PathError(f"The {what} '{p}' does not exist. Check the spelling, or copy the path from your "
                            "file manager's address bar.")
        if not p.is_dir():
            raise PathError(f"'{p}' is a file; the {what} must be a folder.")
        if not os.access(p, os.R_OK | os.X_OK):
            raise PathError(f"The {what} '{p}' cannot be read (no permission).")
        return p

    def file(self, path: str | os.PathLike | None, what: str = "file", suffixes: tuple[str, ...] = ()) -> Path:
        """The checked file (or folder, e.g. a diffusers LoRA folder): it exists, is readable, is allowed."""
        text = str(path or "").strip().strip('"').strip("'")
        if not text:
            raise PathError(f"No {what} given.")
        p = Path(text).expanduser()
        self._check_allowed(p, what)
        if not p.exists():
            raise PathError(f"The {what} '{p}' does not exist.")
        if p.is_file() and suffixes and p.suffix.lower() not in suffixes:
            raise PathError(f"The {what} '{p.name}' should end with {' or '.join(suffixes)}.")
        if not os.access(p, os.R_OK):
            raise PathError(f"The {what} '{p}' cannot be read (no permission).")
        return p

    def check_config(self, cfg: "TrainConfig") -> "TrainConfig":
        """Every path of a config, checked by its field's kind (``config.path_fields``): the ones that must be
        set always, the optional ones when set. Returns the config with the paths cleaned (quotes stripped)."""
        from ..config import path_fields

        changes = {}
        for f in path_fields():
            value = getattr(cfg, f.name)
            if not value and "None" in str(f.type):
                continue
            what = f"{f.name.replace('_', ' ')} ({f.name})"
            kind = f.metadata["kind"]
            if kind == "model":
                changes[f.name] = self.model_ref(value, what)
            elif kind == "data" and Path(str(value).strip().strip('"').strip("'")).is_file():
                changes[f.name] = str(self.file(value, what))
            elif kind == "data":
                changes[f.name] = str(self.folder(value, what))
            elif kind == "file":
                changes[f.name] = str(self.file(value, what))
            elif kind == "output" and not self.allows(value):
                raise PathError(f"The {what} '{value}' is outside the folders this shared app may use.")
        return cfg.replace(**changes)

    def model_ref(self, ref: str | None, what: str = "base model") -> str:
        """A base model reference: a hub id (``owner/name``) passes; a local path is checked like a file."""
        text = str(ref or "").strip().strip('"').strip("'")
        if not text:
            raise PathError(f"No {what} given; pick one from the list or type a folder, file or hub id.")
        p = Path(text).expanduser()
        looks_local = p.is_absolute() or text.startswith((".", "~")) or p.exists() or "\\" in text
        if not looks_local and text.count("/") == 1:
            return text
        return str(self.file(text, what))


def is_local_host(host: str) -> bool:
    return host in LOCAL_HOSTS


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """``"user:password"`` -> ("user", "password"); None for None. Raises PathError-free ValueError on bad text."""
    if text is None:
        return None
    if ":" not in text:
        raise ValueError("--auth must be written user:password")
    user, password = text.split(":", 1)
    if not user or not password:
        raise ValueError("--auth needs both a user name and a password, written user:password")
    return user, password


def generate_password() -> str:
    """A random password for a share link started without ``--auth`` (about 72 bits)."""
    return secrets.token_urlsafe(9)
