"""Faults a creator's machine meets: files and permissions, interrupted and resumed runs, long captions,
relative folders, concurrent model loads, read-only and full disks (issue 19).

The disk tests mount a read-only or a tiny tmpfs; they need root and a working ``mount`` and are skipped
with the reason otherwise (chmod does not stop root, so a read-only folder is a read-only mount here).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from lora_studio.config import TrainConfig
from lora_studio.fileio import atomic_write_bytes, atomic_write_text, is_temp_name, make_temp_dir


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- files: permissions and leftovers ---------------------------------------------------------------------
def test_atomic_writes_keep_the_umask_and_the_old_mode(tmp_path):
    with umask(0o022):
        new = atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
        folder = make_temp_dir(tmp_path, "diffusers")
        assert mode(new) == 0o644 and mode(folder) == 0o755
        caption = tmp_path / "img.txt"
        caption.write_text("old", encoding="utf-8")
        caption.chmod(0o664)
        atomic_write_bytes(caption, b"new")
        assert mode(caption) == 0o664 and caption.read_bytes() == b"new"
    with umask(0o077):
        assert mode(atomic_write_text(tmp_path / "private.txt", "x")) == 0o600
    assert is_temp_name(folder.name) and not list(tmp_path.glob(".config.yaml.*"))
    for name in (".crash.safetensors.k2j3_x9.tmp", ".state.pt.ab12cd34.tmp", ".step_000006.tmp",
                 ".diffusers.tmp-abc_123", ".diffusers.old-x1", ".my_lora.old"):
        assert is_temp_name(name), name
    for name in (".cache", "crash.safetensors", "step_000006", ".gradio", "notes.tmp.txt"):
        assert not is_temp_name(name), name
