"""How much of a hub model has arrived while a loader downloads it.

diffusers and transformers download a hub model inside ``from_pretrained`` and draw their progress bars in
the terminal, where a creator using the app does not look; a first SDXL download is about 7 GB. While a
loader runs, ``download_progress`` watches that model's folder in the Hugging Face cache from a side thread
and reports what arrived every few seconds, so the app shows the download moving:

    with download_progress("stable-diffusion-v1-5/stable-diffusion-v1-5", say):
        pipe = StableDiffusionPipeline.from_pretrained(...)
    # say("Downloading stable-diffusion-v1-5/stable-diffusion-v1-5 from the model hub: 1.31 GB so far (24 MB/s).")
    # say("Downloaded 2.13 GB of stable-diffusion-v1-5/stable-diffusion-v1-5 in 1 min 29 s.")

Nothing is reported for a local folder or file, nor for a model already in the cache (nothing arrives).
"""

from __future__ import annotations

import os
import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

REPORT_EVERY_S = 5.0
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_hub_id(ref: str) -> bool:
    """True for a string that names a hub repository and is not an existing local path."""
    ref = str(ref)
    return not Path(ref).expanduser().exists() and bool(_HUB_ID.match(ref)) and not ref.endswith((".", "-"))


def hub_cache_folder(repo_id: str) -> Path:
    """The model's folder in the Hugging Face cache (``models--owner--name``; it may not exist yet)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (downloads in progress included); 0 when it does not exist."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name), follow_symlinks=False).st_size
            except OSError:  # a file renamed or removed while walking
                pass
    return total


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


class _Watch(threading.Thread):
    def __init__(self, repo_id: str, report: Callable[[str], None], every: float):
        super().__init__(name=f"download-watch {repo_id}", daemon=True)
        self.repo_id, self.report, self.every = repo_id, report, every
        self.folder = hub_cache_folder(repo_id)
        self.start_bytes = folder_bytes(self.folder)
        self.started = time.monotonic()
        self.done = threading.Event()

    def arrived(self) -> int:
        return max(folder_bytes(self.folder) - self.start_bytes, 0)

    def run(self) -> None:
        last, last_t = 0, self.started
        while not self.done.wait(self.every):
            now, now_t = self.arrived(), time.monotonic()
            if now > last:
                rate = (now - last) / max(now_t - last_t, 1e-6)
                self.report(f"Downloading {self.repo_id} from the model hub: {_size(now)} so far "
                            f"({rate / 1e6:.0f} MB/s).")
                last, last_t = now, now_t

    def finish(self) -> None:
        self.done.set()
        self.join()
        arrived = self.arrived()
        if arrived:
            self.report(f"Downloaded {_size(arrived)} of {self.repo_id} in "
                        f"{_duration(time.monotonic() - self.started)}.")


@contextmanager
def download_progress(ref: str | os.PathLike, report: Callable[[str], None] | None,
                      every: float = REPORT_EVERY_S) -> Iterator[None]:
    """Report the download of hub model ``ref`` every ``every`` seconds while the block loads it."""
    if report is None or not is_hub_id(str(ref)):
        yield
        return
    watch = _Watch(str(ref), report, every)
    watch.start()
    try:
        yield
    finally:
        watch.finish()
