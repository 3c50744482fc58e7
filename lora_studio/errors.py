"""Errors with a human message: what is wrong and what to do about it.

Every error a creator can cause (a bad config, a bad dataset, a missing model) is one of these, so the
command line and the app show one clear sentence instead of a traceback.
"""

from __future__ import annotations


class StudioError(Exception):
    """Base class: ``str(err)`` is a complete sentence meant for the user."""


class ConfigError(StudioError):
    """A config value is wrong. ``field`` names the key, ``reason`` says why and what is allowed."""

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"Config error in '{field}': {reason}")


class DatasetError(StudioError):
    """The training data cannot be used (no images, no captions, unreadable folder)."""


class ModelLoadError(StudioError):
    """A base model, VAE or LoRA file could not be found or loaded."""


class TrainingError(StudioError):
    """Training stopped for a reason the user can act on (NaN loss, out of memory, export mismatch)."""


class OutOfMemoryError(TrainingError):
    """The GPU ran out of memory. The message names what to change (the next smaller preset); with
    ``auto_fit: true`` the job catches it and retries with smaller settings."""
