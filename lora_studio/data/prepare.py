"""Prepare a working copy of a dataset: upright RGB copies, resized or center-cropped, with their captions.

The source folder is only read, never written. Each usable image of a ``ScanReport`` is decoded once,
resized, and saved as PNG under the same relative path in the working folder (so kohya repeat folders
such as ``10_mystyle`` survive), with its caption as a ``.txt`` sidecar and/or a ``metadata.csv``.

Modes:
- ``center_crop``: scale the short side to ``resolution`` and cut the middle square (``resolution``²).
- ``keep_aspect``: only shrink, so the short side is at most ``resolution`` (for aspect-ratio buckets).
- ``copy``: no resizing, only the conversion to upright RGB.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image

from lora_studio.data.captions import METADATA_NAME, path_inside, write_metadata_csv, write_txt_captions
from lora_studio.data.images import load_image_rgb
from lora_studio.data.scan import ScanReport
from lora_studio.errors import DatasetError
from lora_studio.data import CAPTION_FORMATS  # noqa: F401  (re-exported)
from lora_studio.data import PREPARE_MODES as MODES
from lora_studio.fileio import atomic_write

log = logging.getLogger(__name__)



@dataclass
class PrepareResult:
    """What ``prepare_dataset`` wrote."""

    output_dir: Path
    written: dict[Path, Path] = field(default_factory=dict)   # source image -> prepared copy
    failed: dict[Path, str] = field(default_factory=dict)    # source image -> reason
    cancelled: bool = False

    def summary(self) -> str:
        text = f"{len(self.written)} image(s) prepared in '{self.output_dir}'"
        if self.failed:
            text += f", {len(self.failed)} failed"
        if self.cancelled:
            text += " (cancelled)"
        return text


def resize_image(img: Image.Image, resolution: int, mode: str = "center_crop") -> Image.Image:
    """Resize one RGB image per ``mode`` (see the module docstring)."""
    if mode not in MODES:
        raise DatasetError(f"Unknown prepare mode '{mode}'; use one of {', '.join(MODES)}.")
    if mode == "copy":
        return img
    w, h = img.size
    short = min(w, h)
    if mode == "keep_aspect":
        if short <= resolution:
            return img
        scale = resolution / short
        return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    scale = resolution / short
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def _check_output_dir(source: Path, output: Path) -> None:
    src, out = source.resolve(), output.resolve()
    if out == src or out in src.parents:
        raise DatasetError(f"The working folder '{output}' is the image folder or contains it; choose another "
                           f"folder so the original images are never overwritten.")
    if src in out.parents:
        raise DatasetError(f"The working folder '{output}' is inside the image folder '{source}'; choose a folder "
                           f"outside it (for example '{source.name}_prepared' next to it).")


def _target_name(rel: str, used: set[str]) -> str:
    stem = rel.rsplit(".", 1)[0]
    name = stem + ".png"
    if name.lower() in used:
        name = f"{stem}_{rel.rsplit('.', 1)[-1].lower()}.png"
    n = 2
    while name.lower() in used:
        name = f"{stem}_{n}.png"
        n += 1
    used.add(name.lower())
    return name


def prepare_dataset(report: ScanReport, output_dir: str | os.PathLike, resolution: int = 512,
                    mode: str = "center_crop", captions: str = "txt",
                    progress: Callable[[int, int, Path], None] | None = None,
                    cancel: threading.Event | None = None) -> PrepareResult:
    """Write resized copies of the usable images of ``report`` (and their captions) into ``output_dir``."""
    if mode not in MODES:
        raise DatasetError(f"Unknown prepare mode '{mode}'; use one of {', '.join(MODES)}.")
    if captions not in CAPTION_FORMATS:
        raise DatasetError(f"Unknown caption format '{captions}'; use one of {', '.join(CAPTION_FORMATS)}.")
    output = Path(output_dir)
    _check_output_dir(report.folder, output)
    output.mkdir(parents=True, exist_ok=True)
    result = PrepareResult(output_dir=output)
    used: set[str] = set()
    rows: dict[str, str] = {}  # name relative to the working folder -> caption
    usable = report.usable
    for done, check in enumerate(usable, start=1):
        if cancel is not None and cancel.is_set():
            result.cancelled = True
            break
        rel = _target_name(check.name, used)
        target = path_inside(output, rel, "working folder")
        try:
            img = resize_image(load_image_rgb(check.path), resolution, mode)
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, lambda tmp, im=img: im.save(tmp, format="PNG"))
        except (DatasetError, OSError) as exc:
            result.failed[check.path] = str(exc)
            log.warning("Could not prepare %s: %s", check.path, exc)
            continue
        result.written[check.path] = target
        if check.caption:
            rows[rel] = check.caption
        if progress is not None:
            progress(done, len(usable), check.path)
    if captions in ("txt", "both") and rows:
        write_txt_captions(output, rows)
    if captions in ("csv", "both") and rows:
        write_metadata_csv(output / METADATA_NAME, rows)
    log.info(result.summary())
    return result
