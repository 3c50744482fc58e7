"""Shared test fixtures: tiny offline models and generated images. No test may touch the network."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory) -> Path:
    """A tiny SD1.5-shaped diffusers pipeline folder (random weights)."""
    from lora_studio.models.tiny import build_tiny_sd15

    return build_tiny_sd15(tmp_path_factory.mktemp("models") / "tiny-sd15")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A tiny SDXL-shaped diffusers pipeline folder (random weights)."""
    from lora_studio.models.tiny import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture()
def demo_images(tmp_path) -> Path:
    """Eight 64 px images with .txt captions, in a fresh folder."""
    from lora_studio.models.tiny import make_demo_images

    return make_demo_images(tmp_path / "images", count=8, size=64)


# Tests that start the app as a server (or several training processes) are end-to-end and long: `slow`.
SLOW_FIXTURES = {"demo_app", "client", "app", "two_process_run"}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
