"""Scan and check a folder of training images: what is wrong with each file and what will be done.

``scan_folder`` opens every image once (fully, so truncated files are caught), and reports per file:
unreadable, empty, too small, extreme aspect ratio, animated, transparency/CMYK/16-bit/palette (converted),
EXIF rotation (turned upright), exact duplicates (same bytes) and near duplicates (perceptual hash), and a
missing caption. The ``ScanReport`` gives the list of usable images, a table for the UI (``rows``) and a
one-line ``summary`` such as "87 of 92 images usable, 5 skipped (2 unreadable, 3 too small), 80 captioned".
Nothing is written; the folder is only read.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from lora_studio.data.captions import load_captions, relative_name
from lora_studio.data.images import is_image_file, list_images, load_image_rgb
from lora_studio.data.tags import repeats_for
from lora_studio.errors import DatasetError
from lora_studio.data import DEFAULT_MAX_ASPECT, DEFAULT_MIN_SIZE  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

NEAR_DUPLICATE_BITS = 4          # dHash bits (of 64) that may differ for "near duplicate"
NEAR_DUPLICATE_COLOUR = 12.0     # mean absolute difference of 8x8 colour thumbnails (0-255)

# Skip categories, in the order the summary lists them.
UNREADABLE, EMPTY, TOO_SMALL, EXTREME_ASPECT, DUPLICATE = (
    "unreadable", "empty", "too small", "extreme aspect ratio", "duplicate")
SKIP_ORDER = (UNREADABLE, EMPTY, TOO_SMALL, EXTREME_ASPECT, DUPLICATE)
ROW_HEADERS = ["file", "size", "problem", "action"]
_CAPTION_SUFFIXES = {".txt", ".caption", ".csv", ".bak", ".json", ".npz", ".toml", ".yaml", ".yml"}

Progress = Callable[[int, int, Path], None]
_ORIENTATION = {2: "mirrored", 3: "rotated 180°", 4: "flipped", 5: "mirrored and rotated", 6: "rotated 90°",
                7: "mirrored and rotated", 8: "rotated 270°"}


@dataclass
class ImageCheck:
    """What the scan found about one file."""

    path: Path
    name: str                      # path relative to the scanned folder, forward slashes
    file_bytes: int = 0
    width: int = 0                 # upright size (after EXIF rotation)
    height: int = 0
    format: str = ""
    mode: str = ""
    frames: int = 1
    skip_reason: str | None = None  # one of SKIP_ORDER, or None when usable
    problems: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    sha256: str = ""
    dhash: int | None = None
    duplicate_of: str | None = None
    near_duplicate_of: str | None = None
    caption: str | None = None
    repeats: int = 1

    @property
    def usable(self) -> bool:
        return self.skip_reason is None

    @property
    def size_text(self) -> str:
        return f"{self.width}×{self.height}" if self.width else "—"

    def skip(self, reason: str, problem: str) -> None:
        self.skip_reason = reason
        self.problems.append(problem)

    def row(self) -> list[str]:
        """``[file, size, problem, action]`` for the UI table."""
        if self.usable:
            action = "use" + (f" ({'; '.join(self.actions)})" if self.actions else "")
        else:
            action = "skip"
        return [self.name, self.size_text, "; ".join(self.problems), action]


@dataclass
class ScanReport:
    """All checks for one folder, plus the counts the summary sentence is made from."""

    folder: Path
    items: list[ImageCheck]
    min_size: int = DEFAULT_MIN_SIZE
    max_aspect: float = DEFAULT_MAX_ASPECT
    ignored_files: list[Path] = field(default_factory=list)
    cancelled: bool = False

    @property
    def usable(self) -> list[ImageCheck]:
        return [c for c in self.items if c.usable]

    @property
    def skipped(self) -> list[ImageCheck]:
        return [c for c in self.items if not c.usable]

    @property
    def usable_images(self) -> list[Path]:
        return [c.path for c in self.items if c.usable]

    @property
    def captions(self) -> dict[Path, str]:
        """Captions of the usable images that have one."""
        return {c.path: c.caption for c in self.items if c.usable and c.caption}

    @property
    def captioned_count(self) -> int:
        return sum(1 for c in self.items if c.usable and c.caption)

    def skip_counts(self) -> dict[str, int]:
        counts = {reason: 0 for reason in SKIP_ORDER}
        for c in self.skipped:
            counts[c.skip_reason] = counts.get(c.skip_reason, 0) + 1
        return {k: v for k, v in counts.items() if v}

    def summary(self) -> str:
        """E.g. "87 of 92 images usable, 5 skipped (2 unreadable, 3 too small), 80 captioned"."""
        total = len(self.items)
        if total == 0:
            return f"No images found in '{self.folder}'."
        text = f"{len(self.usable)} of {total} images usable"
        skipped = len(self.skipped)
        if skipped:
            parts = ", ".join(f"{n} {reason}" for reason, n in self.skip_counts().items())
            text += f", {skipped} skipped ({parts})"
        text += f", {self.captioned_count} captioned"
        if self.cancelled:
            text += " (scan cancelled before the end)"
        return text

    def notes(self) -> list[str]:
        """Extra lines worth showing under the summary (conversions, near duplicates, missing captions)."""
        usable = self.usable
        lines = []
        missing = sum(1 for c in usable if not c.caption)
        if missing:
            lines.append(f"{missing} usable image(s) have no caption yet.")
        near = sum(1 for c in usable if c.near_duplicate_of)
        if near:
            lines.append(f"{near} image(s) look almost the same as another one (kept; consider removing them).")
        converted = sum(1 for c in usable if c.actions)
        if converted:
            lines.append(f"{converted} image(s) will be converted or turned upright when loaded.")
        if self.ignored_files:
            lines.append(f"{len(self.ignored_files)} other file(s) in the folder are not images and were ignored.")
        return lines

    def rows(self, problems_only: bool = False) -> list[list[str]]:
        """Table rows (``ROW_HEADERS``): every file, or only those with a problem."""
        return [c.row() for c in self.items if not problems_only or c.problems]

    def to_dict(self) -> dict:
        """JSON-ready form (paths as strings)."""
        return {
            "folder": str(self.folder), "summary": self.summary(), "notes": self.notes(),
            "min_size": self.min_size, "max_aspect": self.max_aspect, "cancelled": self.cancelled,
            "items": [{**asdict(c), "path": str(c.path), "usable": c.usable} for c in self.items],
        }


def dhash(img: Image.Image, size: int = 8) -> int:
    """Difference hash: ``size*size`` bits, each "is this pixel brighter than its right neighbour"."""
    grey = np.asarray(img.convert("L").resize((size + 1, size), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def colour_thumb(img: Image.Image, size: int = 8) -> np.ndarray:
    """A ``size x size`` RGB thumbnail, so images with the same shapes in other colours stay distinct."""
    return np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BOX), dtype=np.float32)


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two hashes."""
    return bin(a ^ b).count("1")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _header_info(check: ImageCheck) -> bool:
    """Fill format/mode/frames/EXIF notes from the file header. False when the file is not an image."""
    try:
        with Image.open(check.path) as im:
            check.format, check.mode = im.format or "", im.mode
            check.frames = int(getattr(im, "n_frames", 1) or 1)
            orientation = im.getexif().get(0x0112, 1) if hasattr(im, "getexif") else 1
            has_transparency = "transparency" in im.info
    except Exception:  # decoded again by load_image_rgb, which gives the human message
        return False
    mode = check.mode
    if check.frames > 1:
        check.problems.append(f"animated ({check.frames} frames)")
        check.actions.append("first frame used")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and has_transparency):
        check.problems.append("transparency")
        check.actions.append("composited on white")
    elif mode == "P":
        check.problems.append("palette colours")
        check.actions.append("converted to RGB")
    elif mode == "CMYK":
        check.problems.append("CMYK colours")
        check.actions.append("converted to RGB")
    elif mode.startswith("I") or mode == "F":
        check.problems.append("16-bit or float image" if mode != "I" else "high bit depth")
        check.actions.append("scaled to 8-bit RGB")
    elif mode in ("L", "1", "LA"):
        check.problems.append("greyscale")
        check.actions.append("converted to RGB")
    if orientation not in (None, 1):
        check.problems.append(f"EXIF orientation ({_ORIENTATION.get(orientation, orientation)})")
        check.actions.append("turned upright")
    return True


def check_image(path: Path, root: Path, min_size: int = DEFAULT_MIN_SIZE,
                max_aspect: float = DEFAULT_MAX_ASPECT) -> tuple[ImageCheck, Image.Image | None]:
    """Check one file. Returns the check and the decoded RGB image (None when it cannot be used)."""
    check = ImageCheck(path=path, name=relative_name(path, root), repeats=repeats_for(path, root))
    try:
        check.file_bytes = path.stat().st_size
    except OSError as exc:
        check.skip(UNREADABLE, f"cannot be read ({exc.strerror or exc})")
        return check, None
    if check.file_bytes == 0:
        check.skip(EMPTY, "empty file (0 bytes)")
        return check, None
    if not _header_info(check):
        check.skip(UNREADABLE, "not an image (wrong extension or unsupported format)")
        return check, None
    try:
        img = load_image_rgb(path)
    except DatasetError as exc:
        text = str(exc)
        check.skip(UNREADABLE, "truncated or damaged" if "truncated" in text else text)
        return check, None
    check.width, check.height = img.size
    short, long = min(img.size), max(img.size)
    if short < min_size:
        check.skip(TOO_SMALL, f"too small ({check.size_text}, under {min_size} px on the short side)")
        return check, img
    if long / max(short, 1) > max_aspect:
        check.skip(EXTREME_ASPECT, f"extreme aspect ratio ({long / short:.1f}:1, over {max_aspect:g}:1)")
        return check, img
    check.sha256 = _file_sha256(path)
    check.dhash = dhash(img)
    return check, img


def _mark_near_duplicates(checks: list[ImageCheck], thumbs: dict[int, np.ndarray]) -> None:
    usable = [i for i, c in enumerate(checks) if c.usable and c.dhash is not None]
    for pos, i in enumerate(usable):
        for j in usable[:pos]:
            if hamming(checks[i].dhash, checks[j].dhash) > NEAR_DUPLICATE_BITS:
                continue
            if float(np.abs(thumbs[i] - thumbs[j]).mean()) > NEAR_DUPLICATE_COLOUR:
                continue
            checks[i].near_duplicate_of = checks[j].name
            checks[i].problems.append(f"near duplicate of {checks[j].name}")
            break


def scan_folder(folder: str | os.PathLike, min_size: int = DEFAULT_MIN_SIZE,
                max_aspect: float = DEFAULT_MAX_ASPECT, recursive: bool = True,
                metadata_path: str | os.PathLike | None = None, caption_extension: str = ".txt",
                progress: Progress | None = None, cancel: threading.Event | None = None) -> ScanReport:
    """Check every image under ``folder``. ``progress(done, total, path)`` is called after each file."""
    root = Path(folder)
    paths = list_images(root, recursive=recursive)
    report = ScanReport(folder=root, items=[], min_size=min_size, max_aspect=max_aspect)
    report.ignored_files = _ignored_files(root, recursive)
    seen_hashes: dict[str, str] = {}
    thumbs: dict[int, np.ndarray] = {}
    for done, path in enumerate(paths, start=1):
        if cancel is not None and cancel.is_set():
            report.cancelled = True
            log.info("Scan of %s cancelled after %d of %d files", root, done - 1, len(paths))
            break
        check, img = check_image(path, root, min_size, max_aspect)
        if check.usable:
            if check.sha256 in seen_hashes:
                check.duplicate_of = seen_hashes[check.sha256]
                check.skip(DUPLICATE, f"exact copy of {check.duplicate_of}")
            else:
                seen_hashes[check.sha256] = check.name
                thumbs[len(report.items)] = colour_thumb(img)
        report.items.append(check)
        if progress is not None:
            progress(done, len(paths), path)
    _mark_near_duplicates(report.items, thumbs)
    _attach_captions(report, root, metadata_path, caption_extension)
    log.info("%s: %s", root, report.summary())
    return report


def _attach_captions(report: ScanReport, root: Path, metadata_path, caption_extension: str) -> None:
    usable = report.usable
    captions = load_captions(root, [c.path for c in usable], metadata_path, caption_extension)
    for check in usable:
        check.caption = captions.get(check.path)
        if not check.caption:
            check.problems.append("no caption")


def _ignored_files(root: Path, recursive: bool) -> list[Path]:
    """Files that are neither images nor caption/metadata files (shown as a note, never an error)."""
    out = []
    walker = os.walk(root) if recursive else [(str(root), [], [p.name for p in root.iterdir() if p.is_file()])]
    for dirpath, dirs, files in walker:
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith(".") or is_image_file(name) or Path(name).suffix.lower() in _CAPTION_SUFFIXES:
                continue
            out.append(Path(dirpath) / name)
    return sorted(out)
