"""Small helpers shared by the tabs: user-facing errors, progress adapters, thumbnails, cancel flags."""

from __future__ import annotations

import base64
import functools
import io
import logging
import threading
from pathlib import Path
from typing import Any, Callable

import gradio as gr
from PIL import Image

from ..errors import StudioError

log = logging.getLogger(__name__)


def _verbose() -> bool:
    """``--verbose`` (debug logging) shows a traceback for every error, user errors included."""
    return logging.getLogger().isEnabledFor(logging.DEBUG)


def friendly(fn: Callable) -> Callable:
    """Turn the engine's StudioError (and ValueError) into a gr.Error whose text is the user sentence.

    A user error is one line in the terminal (``user error in <handler>: <sentence>``), not a traceback;
    an unexpected error keeps its traceback (once). With ``--verbose`` every error prints its traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error as exc:
            log.warning("user error in %s: %s", fn.__name__, exc.message)
            exc.print_exception = _verbose()
            raise
        except (StudioError, ValueError) as exc:
            log.warning("user error in %s: %s", fn.__name__, exc)
            verbose = _verbose()
            raise gr.Error(str(exc), duration=None, print_exception=verbose) from (exc if verbose else None)
        except Exception as exc:  # a bug: keep the traceback in the terminal, show one sentence
            log.exception("unexpected error in %s", fn.__name__)
            raise gr.Error(f"Unexpected error ({exc.__class__.__name__}: {exc}). The details are in the terminal "
                           "window; please report them.", duration=None, print_exception=False) from None

    return wrapper


def progress_callback(progress: gr.Progress, what: str, start: float = 0.0, span: float = 1.0):
    """An engine-style ``progress(done, total, item)`` that drives a gradio progress bar."""

    def update(done: int, total: int, item: Any = None) -> None:
        """``item``: a file (its name is shown) or a message such as a download's progress (shown as is)."""
        frac = start + span * (done / max(total, 1))
        is_file = isinstance(item, Path) or (isinstance(item, str) and Path(item).exists())
        name = Path(item).name if is_file else (str(item) if item else "")
        progress(frac, desc=f"{what} {done}/{total}" + (f": {name}" if name else ""))

    return update


def thumbnail(path: str | Path, size: int = 160) -> Image.Image | None:
    """An upright RGB thumbnail of an image file, or None if it cannot be read."""
    from ..data.images import load_image_rgb

    try:
        img = load_image_rgb(path)
    except Exception:
        return None
    img.thumbnail((size, size))
    return img


def thumbnail_html(path: str | Path, size: int = 56) -> str:
    """An ``<img>`` tag with the thumbnail inlined (works for any folder, no file is served)."""
    img = thumbnail(path, size)
    if img is None:
        return "(unreadable)"
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img src="data:image/jpeg;base64,{data}" alt="{Path(path).name}" style="height:{size}px">'


class CancelFlags:
    """One cancel flag per browser session (a Cancel button sets it, the worker checks it)."""

    def __init__(self) -> None:
        self._flags: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def fresh(self, key: str) -> threading.Event:
        with self._lock:
            event = threading.Event()
            self._flags[key] = event
            return event

    def cancel(self, key: str) -> bool:
        with self._lock:
            event = self._flags.get(key)
        if event is None:
            return False
        event.set()
        return True


def session_key(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "default"
