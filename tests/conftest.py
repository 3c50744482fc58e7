"""Shared test fixtures: tiny offline models and generated images. No test may touch the network."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread: the tiny models' operations are too small for a second one to pay, and tests that start
# a second process (the app server, two-process training) would otherwise oversubscribe two cores. Measured:
# 72 s instead of 85 s for the SD1.5 training and epsilon-proof tests on a quiet 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")

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


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory) -> Path:
    """A tiny Llama-style causal LM folder with its tokenizer (random weights)."""
    from lora_studio.models.tiny_llm import build_tiny_llm

    return build_tiny_llm(tmp_path_factory.mktemp("models") / "tiny-llm")


@pytest.fixture(scope="session")
def llm_data(tmp_path_factory) -> Path:
    """16 Alpaca-style training rows (JSONL)."""
    from lora_studio.models.tiny_llm import make_demo_llm_data

    return make_demo_llm_data(tmp_path_factory.mktemp("data") / "train.jsonl")


# Tests that start the app as a server (or several training processes) are end-to-end and long: `slow`.
SLOW_FIXTURES = {"demo_app", "client", "app", "two_process_run"}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
