"""Hub downloads show their progress: the watcher reports the bytes arriving in the model's cache folder."""

from __future__ import annotations

import threading
import time

import pytest

from lora_studio.models.download import download_progress, folder_bytes, hub_cache_folder, is_hub_id


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def _download(folder, chunks: int, size: int, pause: float) -> None:
    """Write a file the way huggingface_hub does: a growing blobs/<hash>.incomplete."""
    blobs = folder / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    with open(blobs / "0123abcd.incomplete", "ab") as fh:
        for _ in range(chunks):
            fh.write(b"x" * size)
            fh.flush()
            time.sleep(pause)


def test_a_download_is_reported_while_it_runs_and_when_it_ends(hub_cache):
    repo = "owner/some-model"
    said: list[str] = []
    folder = hub_cache_folder(repo)
    assert folder == hub_cache / "models--owner--some-model"
    (folder / "blobs").mkdir(parents=True)
    (folder / "blobs" / "already-there").write_bytes(b"y" * 1000)  # an earlier partial download is not counted
    with download_progress(repo, said.append, every=0.05):
        _download(folder, chunks=6, size=2_000_000, pause=0.05)
    assert folder_bytes(folder) == 12_001_000
    during = [s for s in said if s.startswith(f"Downloading {repo} from the model hub:")]
    assert during and all("MB so far" in s and "MB/s" in s for s in during), said
    assert said[-1].startswith(f"Downloaded 12 MB of {repo} in "), said


def test_nothing_is_reported_for_local_models_or_cached_ones(hub_cache, tmp_path):
    said: list[str] = []
    local = tmp_path / "my-model"
    local.mkdir()
    assert not is_hub_id(str(local)) and is_hub_id("owner/name") and not is_hub_id("owner/name/extra")
    with download_progress(str(local), said.append, every=0.01):
        time.sleep(0.05)
    with download_progress("owner/cached", said.append, every=0.01):  # loads from the cache: nothing arrives
        time.sleep(0.05)
    assert said == []
    assert not any(t.name.startswith("download-watch") for t in threading.enumerate())


def test_captioner_loading_reports_the_download(hub_cache):
    """load_model_part passes the report to the watcher around the loader (a real loader downloads there)."""
    from lora_studio.captioning.loading import load_model_part

    said: list[str] = []
    repo = "owner/captioner"

    def loader(ref: str) -> str:
        _download(hub_cache_folder(ref), chunks=3, size=500_000, pause=0.05)
        return "model"

    assert load_model_part(loader, repo, "BLIP captioning model", report=said.append) == "model"
    assert said and said[-1].startswith("Downloaded 2 MB of owner/captioner in "), said


@pytest.mark.slow
def test_the_progress_bar_shows_a_message_whole():
    from lora_studio.ui.common import progress_callback

    shown: list[str] = []
    update = progress_callback(lambda frac, desc="": shown.append(desc), "Captioning")
    update(0, 4, "Downloading owner/model from the model hub: 120 MB so far (30 MB/s).")
    assert shown[-1] == "Captioning 0/4: Downloading owner/model from the model hub: 120 MB so far (30 MB/s)."
