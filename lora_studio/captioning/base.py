"""The one captioner interface: load once, caption a batch with progress and cancel, release after.

A ``Captioner`` subclass implements ``load``, ``release`` and ``_caption_batch`` (a list of RGB images to
a list of strings), and may implement ``prepare`` (resize one image to the model's input, once, with a good
filter, so the processor does not resize it again). ``kind`` says whether it writes a sentence or tags.
``caption`` does the rest: decodes each file (a bad file becomes an error result, the batch goes on),
groups images into batches, reports ``progress(done, total, path)``, stops between batches
when ``cancel`` is set, and releases the model afterwards unless it was already loaded by the caller
(``with captioner: ...`` keeps it loaded across several calls).
"""

from __future__ import annotations

import gc
import logging
import os
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, Union

from PIL import Image

from lora_studio.data.images import load_image_rgb
from lora_studio.errors import DatasetError, ModelLoadError

log = logging.getLogger(__name__)

ImageInput = Union[str, os.PathLike, Image.Image]
Progress = Callable[[int, int, "Path | None"], None]


@dataclass
class CaptionResult:
    """One image's outcome: ``text`` on success, ``error`` (a sentence) when it could not be captioned."""

    path: Path | None
    text: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def pick_device(device: str | None = None) -> str:
    """``device`` if given, else ``cuda`` when available, else ``cpu``."""
    if device:
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(device: str):
    """bf16 on a CUDA GPU that has it (fp16 on an older one), fp32 elsewhere."""
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def free_memory() -> None:
    """Give memory back after a model is dropped (Python objects and the CUDA cache)."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - freeing memory must never fail a run
        pass


class Captioner(ABC):
    """Base class of every captioner (BLIP captions, CLIP style tags, ...)."""

    name: str = "captioner"
    kind: str = "sentence"  # "sentence" or "tags": how its text joins others and takes a caption style

    def __init__(self, batch_size: int = 4, device: str | None = None):
        self.batch_size = max(1, int(batch_size))
        self.device = device

    @property
    def loaded(self) -> bool:
        """True while the model is in memory (subclasses keep it in ``self._model``)."""
        return getattr(self, "_model", None) is not None

    @abstractmethod
    def load(self, report: Callable[[str], None] | None = None) -> None:
        """Load the model (raises ``ModelLoadError`` with one clear sentence); ``report`` hears how a hub
        download is going."""

    @abstractmethod
    def release(self) -> None:
        """Drop the model and free its memory."""

    @abstractmethod
    def _caption_batch(self, images: list[Image.Image]) -> list[str]:
        """Captions for a list of RGB images, same order."""

    def prepare(self, image: Image.Image) -> Image.Image:
        """The image as the model takes it (subclasses resize it here, once); called once per image."""
        return image

    def __enter__(self) -> "Captioner":
        self.load()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def caption(self, images: Sequence[ImageInput], progress: Progress | None = None,
                cancel: threading.Event | None = None) -> list[CaptionResult]:
        """Caption ``images`` (paths or PIL images), in order. Shorter than ``images`` when cancelled."""
        items = list(images)
        results: list[CaptionResult] = []
        if not items or (cancel is not None and cancel.is_set()):
            return results
        was_loaded = self.loaded
        if not was_loaded:
            self.load(report=(lambda text: progress(0, len(items), text)) if progress is not None else None)
        try:
            for start in range(0, len(items), self.batch_size):
                if cancel is not None and cancel.is_set():
                    log.info("%s: cancelled after %d of %d images", self.name, len(results), len(items))
                    break
                results.extend(self._run_chunk(items[start:start + self.batch_size]))
                if progress is not None:
                    last = results[-1].path if results else None
                    progress(len(results), len(items), last)
        finally:
            if not was_loaded:
                self.release()
        return results

    def _run_chunk(self, chunk: list[ImageInput]) -> list[CaptionResult]:
        out: list[CaptionResult] = []
        decoded: list[tuple[int, Image.Image]] = []
        for item in chunk:
            path = None if isinstance(item, Image.Image) else Path(item)
            out.append(CaptionResult(path=path))
            try:
                img = item.convert("RGB") if isinstance(item, Image.Image) else load_image_rgb(item)
            except DatasetError as exc:
                out[-1].error = str(exc)
                continue
            try:
                img = self.prepare(img)
            except Exception as exc:  # e.g. a 1-pixel-wide strip: this image only
                out[-1].error = f"{self.name} cannot take this image ({exc})."
                continue
            decoded.append((len(out) - 1, img))
        if not decoded:
            return out
        try:
            texts = self._caption_batch([img for _, img in decoded])
        except ModelLoadError:
            raise
        except Exception as exc:  # e.g. out of memory on one batch: report it, keep going
            log.exception("%s failed on a batch", self.name)
            for idx, _ in decoded:
                out[idx].error = f"{self.name} failed on this image ({type(exc).__name__}: {exc})"
            return out
        for (idx, _), text in zip(decoded, texts):
            out[idx].text = text
        return out
