"""Caption tags and kohya folder conventions.

- A caption is a comma-separated list of tags ("mystyle, a red circle, watercolor"); ``split_tags`` and
  ``join_tags`` are the one definition of that, shared with the batch edits.
- Kohya folders put the repeat count in the folder name: ``10_mystyle`` means every image inside is seen
  10 times per epoch. ``parse_repeats_folder`` and ``repeats_for`` read that.
- ``tag_frequency`` counts tags per folder for the ``ss_tag_frequency`` metadata of an exported LoRA
  (``{folder name: {tag: count}}``), the way kohya's scripts do.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping

_REPEATS_RE = re.compile(r"^(\d+)_(.+)$")


def split_tags(caption: str) -> list[str]:
    """The comma-separated tags of a caption, stripped, empty ones dropped (new lines count as commas)."""
    return [t.strip() for t in re.split(r"[,\n]", caption) if t.strip()]


def join_tags(tags: Iterable[str]) -> str:
    """Tags joined back with ", "."""
    return ", ".join(t.strip() for t in tags if t and t.strip())


def parse_repeats_folder(name: str) -> tuple[int, str] | None:
    """``"10_mystyle"`` -> ``(10, "mystyle")``; ``None`` for a name without a repeat count (or 0 repeats)."""
    match = _REPEATS_RE.match(name.strip())
    if not match:
        return None
    repeats = int(match.group(1))
    if repeats < 1:
        return None
    return repeats, match.group(2).strip()


def repeats_for(path: str | os.PathLike, root: str | os.PathLike | None = None, default: int = 1) -> int:
    """Repeat count of an image from the nearest kohya folder name (``10_mystyle`` -> 10).

    With ``root``, folders from the image's own folder up to and including ``root`` are looked at;
    without it, only the image's own folder. ``default`` when no folder carries a count.
    """
    path = Path(path)
    folders = [path.parent]
    if root is not None:
        root_r = Path(root).resolve()
        current = path.parent.resolve()
        folders = []
        while True:
            folders.append(current)
            if current == root_r or current.parent == current or root_r not in current.parents:
                break
            current = current.parent
    for folder in folders:
        parsed = parse_repeats_folder(folder.name)
        if parsed:
            return parsed[0]
    return default


def folder_key(path: str | os.PathLike, root: str | os.PathLike | None = None) -> str:
    """The ``ss_tag_frequency`` key of an image: the name of its folder (``10_mystyle``), as kohya writes it."""
    path = Path(path)
    name = path.parent.name
    if not name and root is not None:
        name = Path(root).resolve().name
    return name or "images"


def tag_frequency(captions: Mapping[str | os.PathLike, str],
                  root: str | os.PathLike | None = None) -> dict[str, dict[str, int]]:
    """``{folder name: {tag: count}}`` over the captions (keys are image paths), lower-cased as kohya does."""
    per_folder: dict[str, Counter] = {}
    for image, caption in captions.items():
        key = folder_key(Path(root) / image if root is not None and not Path(image).is_absolute() else image, root)
        per_folder.setdefault(key, Counter()).update(t.lower() for t in split_tags(caption or ""))
    return {folder: dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
            for folder, counts in sorted(per_folder.items())}


def top_tags(frequency: Mapping[str, Mapping[str, int]], n: int = 20) -> list[tuple[str, int]]:
    """The ``n`` most frequent tags over all folders (for a summary or the UI)."""
    total: Counter = Counter()
    for counts in frequency.values():
        total.update(counts)
    return sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
