"""Logging for the app and the command line: our messages, not the libraries' chatter.

diffusers and transformers warn about things a creator cannot act on ("modules that should be kept in
float32: []", a missing torchvision, "No LoRA keys associated to CLIPTextModel"); their verbosity is set to
errors unless ``--verbose`` is given (then everything is shown). Their progress bars stay: downloading and
loading a real model takes a while.
"""

from __future__ import annotations

import logging
import os

NOISY = ("httpx", "urllib3", "PIL", "matplotlib", "asyncio", "httpcore", "python_multipart")


def setup_logging(verbose: bool, level: int = logging.WARNING, fmt: str = "%(levelname)s %(name)s: %(message)s",
                  datefmt: str | None = None) -> None:
    """Our loggers at ``level`` (DEBUG with ``verbose``); libraries' warnings hidden unless ``verbose``."""
    logging.basicConfig(level=logging.DEBUG if verbose else level, format=fmt, datefmt=datefmt)
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)
    if not verbose:  # torchao cannot load its CUDA kernels into a CPU-only torch and says so at import
        logging.getLogger("torchao").setLevel(logging.ERROR)
    if not verbose:  # read by the libraries when they are first imported (after this)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
