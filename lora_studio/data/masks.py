"""Loss masks (``masked_loss: true``): which pixels of an image train, and how much.

A mask is found for each image in this order:

1. ``<train_data_dir>/masks/<same relative path>`` with any image extension (``masks/cat.png`` for ``cat.jpg``,
   ``masks/10_style/cat.png`` for ``10_style/cat.jpg``), then ``masks/<same name>`` for an image in a sub-folder;
2. the image's own alpha channel (a PNG/WebP with transparency);
3. none: the whole image trains.

A grayscale mask is read as a weight: white 1 (trains fully), black 0 (ignored), grey in between. It is
resized and cropped exactly like its image (``buckets.resize_to_bucket``), then averaged down to the latent
grid (``latent_mask``). The ``masks/`` folder is never read as training images (``images.list_images``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .buckets import resize_to_bucket
from .images import IMAGE_EXTENSIONS

MASKS_DIR = "masks"
ALPHA = "alpha"
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def has_alpha(image: Path) -> bool:
    """True when the image file carries transparency (reads the header only)."""
    try:
        with Image.open(image) as img:
            return img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info)
    except Exception:
        return False


def find_mask(image: Path, root: Path) -> Path | None:
    """The mask file for ``image`` in ``root/masks`` (same relative path or same name, any extension), or None."""
    folder = Path(root) / MASKS_DIR
    if not folder.is_dir():
        return None
    try:
        relative = Path(image).relative_to(root)
    except ValueError:
        relative = Path(Path(image).name)
    for base in dict.fromkeys([folder / relative.parent, folder]):
        for ext in sorted(IMAGE_EXTENSIONS):
            for candidate in (base / f"{relative.stem}{ext}", base / f"{relative.stem}{ext.upper()}"):
                if candidate.is_file():
                    return candidate
    return None


def mask_source(image: Path, root: Path) -> Path | str | None:
    """Where ``image``'s mask comes from: a file in ``masks/``, ``"alpha"``, or None (no mask)."""
    found = find_mask(image, root)
    if found is not None:
        return found
    return ALPHA if has_alpha(image) else None


def load_mask(image: Path, source: Path | str, size: tuple[int, int] | None = None) -> Image.Image:
    """The mask as an 8-bit grayscale image, upright and at the image's size (``size``: upright width, height)."""
    path = Path(image) if source == ALPHA else Path(source)
    with Image.open(path) as img:
        img.seek(0)
        upright = ImageOps.exif_transpose(img)
        if source == ALPHA:
            mask = upright.convert("RGBA").getchannel("A")
        else:
            mask = upright.convert("L")
        mask.load()
    if size is not None and mask.size != tuple(size):
        mask = mask.resize(tuple(size), Image.Resampling.BILINEAR)
    return mask


def bucket_mask(image: Path, source: Path | str, size: tuple[int, int], bucket: tuple[int, int]) -> torch.Tensor:
    """The mask resized and cropped like its image to ``bucket``: a (H, W) float tensor in [0, 1]."""
    mask, _ = resize_to_bucket(load_mask(image, source, size), bucket)
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)


def latent_mask(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """A (H, W) pixel mask averaged down to the latent grid: (1, h, w)."""
    import torch.nn.functional as F

    return F.interpolate(mask[None, None].float(), size=tuple(latent_hw), mode="area")[0]


def mask_overlay(image: Image.Image, mask: Image.Image, colour: tuple[int, int, int] = (220, 40, 40)) -> Image.Image:
    """``image`` with the ignored parts (black in the mask) tinted, for the Dataset tab's thumbnails."""
    rgb = image.convert("RGB")
    mask = mask.resize(rgb.size, Image.Resampling.BILINEAR)
    tint = Image.new("RGB", rgb.size, colour)
    ignored = Image.eval(mask, lambda v: int((255 - v) * 0.6))
    return Image.composite(tint, rgb, ignored)


def attach_masks(items, root: Path) -> tuple[int, int]:
    """Set each training item's ``mask`` (its ``mask_source``); returns (masks from files, masks from alpha)."""
    files = alpha = 0
    for item in items:
        item.mask = mask_source(item.path, Path(root))
        files += isinstance(item.mask, Path)
        alpha += item.mask == ALPHA
    return files, alpha
