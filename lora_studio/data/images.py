"""Finding and opening training images: any common format becomes an 8-bit RGB ``PIL.Image``.

``load_image_rgb`` is the one place an image file is decoded. It loads the whole file (so a truncated
file fails here, not in the middle of training), applies the EXIF orientation, takes the first frame of
an animation and converts alpha, palette, greyscale, CMYK and 16-bit/float images to RGB. A file that
cannot be used raises ``DatasetError`` with a sentence a creator can act on.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lora_studio.errors import DatasetError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})

# Modes that ``Image.convert("RGB")`` handles correctly on its own.
_DIRECT_MODES = {"RGB", "L", "1", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the file name ends with a supported image extension (any letter case)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Image files under ``folder`` (sorted; hidden files and folders such as ``.cache`` are skipped).

    The paths are absolute (``folder`` made absolute, links not followed), so they mean the same file
    whichever folder they are later joined to or looked up from (a relative ``data`` gives ``/cwd/data/a.png``,
    never ``data/a.png``, which ``data`` + name would turn into ``data/data/a.png``)."""
    given = Path(folder)
    if not given.is_dir():
        raise DatasetError(f"The image folder '{given}' does not exist or is not a folder.")
    folder = Path(os.path.abspath(given))
    found: list[Path] = []
    if recursive:
        for root, dirs, files in os.walk(folder):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found.extend(Path(root) / f for f in files if not f.startswith(".") and is_image_file(f))
    else:
        found = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and is_image_file(p)]
    return sorted(found, key=lambda p: p.as_posix())


def _high_bit_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer or float greyscale -> 8-bit RGB, scaled (not clipped)."""
    arr = np.asarray(img)
    if arr.dtype.kind == "f":
        arr = np.nan_to_num(arr.astype(np.float64))
        hi = float(arr.max()) if arr.size else 0.0
        lo = float(arr.min()) if arr.size else 0.0
        if lo >= 0.0 and hi <= 1.0:
            scaled = arr * 255.0
        elif hi > lo:
            scaled = (arr - lo) / (hi - lo) * 255.0
        else:
            scaled = np.zeros_like(arr)
    else:
        arr = arr.astype(np.int64)
        hi = int(arr.max()) if arr.size else 0
        lo = int(arr.min()) if arr.size else 0
        if lo >= 0 and hi <= 255 and img.mode not in ("I;16", "I;16L", "I;16B", "I;16N"):
            scaled = arr.astype(np.float64)  # a 32-bit container holding 8-bit values
        elif lo >= 0 and hi <= 65535:
            scaled = arr / 257.0  # 16-bit range -> 8-bit range
        else:
            scaled = (arr - lo) / max(hi - lo, 1) * 255.0
    out = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L").convert("RGB")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels are composited on ``background`` (white)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        return _high_bit_to_rgb(img)
    if mode in _DIRECT_MODES:
        return img.convert("RGB")
    return img.convert("RGB")


def load_image_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image file fully as 8-bit RGB, upright (EXIF), first frame. Raises ``DatasetError``."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DatasetError(f"Image '{path}' was not found.") from None
    except OSError as exc:
        raise DatasetError(f"Image '{path}' cannot be read: {exc.strerror or exc}.") from None
    if size == 0:
        raise DatasetError(f"Image '{path.name}' is an empty file (0 bytes).")
    try:
        with Image.open(path) as im:
            im.seek(0)
            im.load()
            try:
                upright = ImageOps.exif_transpose(im)
            except Exception as exc:  # a broken EXIF block should not cost the image
                log.warning("Ignoring unreadable EXIF orientation in %s: %s", path, exc)
                upright = im
            rgb = to_rgb(upright)
            if rgb is im:
                rgb = im.copy()
            rgb.load()
            return rgb
    except DatasetError:
        raise
    except UnidentifiedImageError:
        raise DatasetError(f"'{path.name}' is not an image Pillow can read (wrong extension or unsupported "
                           f"format).") from None
    except Image.DecompressionBombError:
        raise DatasetError(f"Image '{path.name}' is too large to open safely (over "
                           f"{Image.MAX_IMAGE_PIXELS * 2:,} pixels); resize it first.") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        msg = str(exc)
        if "truncated" in msg.lower() or isinstance(exc, EOFError):
            raise DatasetError(f"Image '{path.name}' is truncated or damaged (the file ends early); "
                               f"re-export or re-download it.") from None
        raise DatasetError(f"Image '{path.name}' is damaged and cannot be decoded ({msg or type(exc).__name__}).") \
            from None
