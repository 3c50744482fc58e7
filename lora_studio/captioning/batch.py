"""Caption a whole folder: a sentence (BLIP, Florence-2, Qwen-VL, JoyCaption) and/or tags (WD14, CLIP style
tags) + trigger word, saved to metadata.csv / .txt.

``caption_folder`` scans the folder (only readable images are captioned, exact duplicates once), keeps
every existing caption unless ``overwrite`` is set (a person may have edited it), runs each captioner
over the images that need a caption (one model in memory at a time, released after its pass), shapes each
output for the caption ``style`` (``style.shape_caption``), joins the parts in the order the captioners
were given (a sentence, then tags), and places the trigger word (first by default, exactly once).
Captions are written atomically; the previous ``metadata.csv`` is kept as ``metadata.csv.bak``.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from lora_studio.captioning.base import Captioner
from lora_studio.captioning.style import merge_parts, place_trigger, shape_caption
from lora_studio.data.captions import (METADATA_NAME, load_captions, relative_name, write_metadata_csv,
                                       write_txt_captions)
from lora_studio.data.scan import ScanReport, scan_folder

log = logging.getLogger(__name__)

Progress = Callable[[int, int, "Path | None"], None]


@dataclass
class CaptionRun:
    """The outcome of ``caption_images`` / ``caption_folder``."""

    captions: dict[Path, str] = field(default_factory=dict)   # final caption of every captioned image
    generated: list[Path] = field(default_factory=list)       # images captioned by a model this run
    kept: list[Path] = field(default_factory=list)            # existing captions left as they were
    failed: dict[Path, str] = field(default_factory=dict)     # image -> why it got no caption
    cancelled: bool = False
    written: list[Path] = field(default_factory=list)         # caption files written
    report: ScanReport | None = None

    def summary(self) -> str:
        text = (f"{len(self.captions)} image(s) captioned: {len(self.generated)} new, "
                f"{len(self.kept)} existing kept")
        if self.failed:
            text += f", {len(self.failed)} failed"
        if self.report is not None and self.report.skipped:
            text += f", {len(self.report.skipped)} file(s) skipped by the check"
        if self.cancelled:
            text += " (cancelled: the rest were not captioned)"
        return text


def caption_images(images: list[Path], captioners: list[Captioner], existing: Mapping[Path, str] | None = None,
                   trigger: str | None = None, overwrite: bool = False, progress: Progress | None = None,
                   cancel: threading.Event | None = None, style: str | None = None,
                   trigger_placement: str = "start") -> CaptionRun:
    """Caption ``images`` with each captioner in turn and join their outputs (no files written).

    ``style`` (tags, short, detailed) shapes each output; None keeps them as the captioners wrote them."""
    existing = {Path(k): v.strip() for k, v in (existing or {}).items() if v and v.strip()}
    run = CaptionRun()
    todo = [p for p in images if overwrite or p not in existing]
    run.kept = [p for p in images if p not in todo]
    parts: dict[Path, list[str]] = {p: [] for p in todo}
    total = len(todo) * len(captioners)
    for stage, captioner in enumerate(captioners):
        targets = [p for p in todo if p in parts]
        offset = stage * len(todo)

        def stage_progress(done: int, _total: int, path, offset=offset) -> None:
            if progress is not None:
                progress(offset + done, total, path)

        results = captioner.caption(targets, progress=stage_progress, cancel=cancel)
        for path, result in zip(targets, results):
            if result.ok:
                text = shape_caption(result.text, style, captioner.kind)
                if text:
                    parts[path].append(text)
            else:
                run.failed[path] = result.error or "unknown error"
                parts.pop(path, None)
        if len(results) < len(targets):
            run.cancelled = True  # what was captioned so far is kept
            break
    for path in images:
        if parts.get(path):
            text = merge_parts(parts[path])
            run.generated.append(path)
        elif path in existing:
            text = existing[path]  # kept, failed or cancelled: the old caption stays
            if path not in run.kept:
                run.kept.append(path)
        else:
            if path in parts and path not in run.failed and not run.cancelled:
                run.failed[path] = "the captioner returned an empty caption"
            continue
        run.captions[path] = place_trigger(text, trigger, trigger_placement)
    return run


def caption_folder(folder: str | os.PathLike, captioners: list[Captioner], output_csv: str | os.PathLike | None = None,
                   trigger: str | None = None, overwrite: bool = False, write_txt: bool = False,
                   write_csv: bool = True, min_size: int = 1, progress: Progress | None = None,
                   cancel: threading.Event | None = None, style: str | None = None,
                   trigger_placement: str = "start") -> CaptionRun:
    """Caption every readable image in ``folder`` and save the captions (see the module docstring).

    ``file_name`` in the CSV is the image path relative to ``folder``. Existing captions are read from
    ``output_csv`` (when it exists), ``<folder>/metadata.csv`` and ``.txt`` sidecars.
    """
    root = Path(folder)
    csv_path = Path(output_csv) if output_csv else root / METADATA_NAME
    report = scan_folder(root, min_size=min_size, max_aspect=float("inf"),
                         metadata_path=csv_path if csv_path.is_file() else None)
    images = report.usable_images
    existing = load_captions(root, images, csv_path if csv_path.is_file() else None)
    run = caption_images(images, captioners, existing, trigger=trigger, overwrite=overwrite,
                         progress=progress, cancel=cancel, style=style, trigger_placement=trigger_placement)
    run.report = report
    if write_csv and run.captions:
        rows = {relative_name(p, root): run.captions[p] for p in images if p in run.captions}
        run.written.append(write_metadata_csv(csv_path, rows))
    if write_txt and run.captions:
        changed = {p: t for p, t in run.captions.items() if p in run.generated or t != existing.get(p)}
        run.written.extend(write_txt_captions(root, changed))
    log.info("%s: %s", root, run.summary())
    return run
