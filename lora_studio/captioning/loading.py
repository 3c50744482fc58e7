"""Loading captioning models from a hub id or a local folder, with one clear error sentence on failure.

A reference that exists on disk is a local folder. One that does not, but looks like a hub id
(``Salesforce/blip-image-captioning-base``), is looked up in the Hugging Face cache or downloaded. Anything
else is a missing folder. Every failure becomes ``ModelLoadError`` saying which, and what to do.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, TypeVar

from lora_studio.errors import ModelLoadError
from lora_studio.models.download import download_progress, is_hub_id
from lora_studio.models.load_lock import model_loading

log = logging.getLogger(__name__)

T = TypeVar("T")


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def load_model_part(loader: Callable[[str], T], ref: str | os.PathLike, what: str,
                    report: Callable[[str], None] | None = None) -> T:
    """Call ``loader(ref)``; turn any failure into ``ModelLoadError`` with one sentence about ``what``.

    ``report`` receives how much of a hub model has arrived while it downloads (``models.download``)."""
    ref_s = str(Path(ref).expanduser()) if not is_hub_id(str(ref)) else str(ref)
    if not is_hub_id(ref_s) and not Path(ref_s).exists():
        raise ModelLoadError(f"The {what} folder '{ref_s}' does not exist; give an existing folder or a "
                             f"Hugging Face model id.")
    try:
        with model_loading(f"the {what}"), download_progress(ref_s, report):
            return loader(ref_s)
    except ModelLoadError:
        raise
    except ImportError as exc:
        raise ModelLoadError(f"The {what} '{ref_s}' needs a Python package that is not installed ({exc}).") from exc
    except Exception as exc:  # transformers raises OSError, ValueError, EnvironmentError, KeyError...
        log.debug("Loading %s from %s failed", what, ref_s, exc_info=True)
        if is_hub_id(ref_s):
            why = "offline mode is on (HF_HUB_OFFLINE)" if _offline() else "the download failed or the id is wrong"
            raise ModelLoadError(
                f"The {what} '{ref_s}' could not be loaded: it is not in the local Hugging Face cache and "
                f"{why}; connect to the internet once to download it, or pass a local model folder instead."
            ) from exc
        first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"The {what} folder '{ref_s}' could not be loaded ({first_line}); it should be a "
                             f"folder written by save_pretrained, with its config, weights and "
                             f"tokenizer/processor files.") from exc
