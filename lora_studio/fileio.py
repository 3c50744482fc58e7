"""Atomic file writes: write a temporary file in the same folder, then rename it over the target.

A crash or a full disk never leaves a half-written LoRA, caption table, checkpoint or state file.
Temporary files are named ``.<name>.<random>.tmp`` (folders ``.<name>.tmp-<random>``), so what a killed
process leaves behind is recognisable (``is_temp_name``) and removed when its run starts again.

New files get the usual permissions of the user's umask (typically 0644, folders 0755), not the 0600/0700
of ``tempfile.mkstemp``/``mkdtemp``, so other tools of the user can read a LoRA; a file that is replaced
keeps its own mode (a caption file the user made group-writable stays so).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any, Callable

_TEMP_RE = re.compile(r"^\..+(\.tmp|\.tmp-[^.]+|\.old|\.old-[^.]+)$")


def is_temp_name(name: str) -> bool:
    """True for the names this module (and the exporters) give temporary files and folders."""
    return bool(_TEMP_RE.match(name))


def _new_temp_file(folder: Path, name: str) -> str:
    """Create an empty ``.<name>.<random>.tmp`` in ``folder`` with the umask's permissions; its path."""
    for _ in range(100):
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0666 & ~umask
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"no free temporary name for {name} in {folder}")


def make_temp_dir(parent: str | os.PathLike, name: str) -> Path:
    """A new empty folder ``.<name>.tmp-<random>`` in ``parent`` with the umask's permissions."""
    parent = Path(parent)
    for _ in range(100):
        folder = parent / f".{name}.tmp-{secrets.token_hex(4)}"
        try:
            folder.mkdir(0o777)  # 0777 & ~umask
        except FileExistsError:
            continue
        return folder
    raise FileExistsError(f"no free temporary folder name for {name} in {parent}")


def atomic_write(path: str | os.PathLike, writer: Callable[[str], None]) -> Path:
    """Call ``writer(tmp_path)`` to write a temporary file, then move it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp_file(path.parent, path.name)
    try:
        old_mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        old_mode = None
    try:
        if old_mode is not None:
            os.chmod(tmp, old_mode)
        writer(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    return atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str))


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` through a temporary file (tensors made contiguous first)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
