"""One lock for every model load in this process: ``with model_loading("the base model"): ...``.

Loading a diffusers model (``from_pretrained``, ``from_single_file``) or a LoRA into one (``load_lora_weights``
with peft's low-memory path) runs inside accelerate's ``init_empty_weights``, which patches
``torch.nn.Module.register_parameter`` for the whole process while it loads. Two loads on two threads at once
(Start in the Training tab and Render strengths in the Testing tab, two captioners, two browser tabs) can
interleave the patch and its undo so that it stays installed for good: every ``nn.Linear`` made afterwards is
created on the ``meta`` device ("Cannot copy out of meta tensor") until the app restarts. And a module built
on one thread while another thread is inside the patch lands on ``meta`` too.

So every place that loads a model or adds an adapter holds this lock for the load: the trainers (model and
LoRA), the export checks, the Testing tab's grids and LLM answers, and the captioners. It is re-entrant (a
trainer holding it may call a loader that takes it again). Only the loading is serialised; rendering,
captioning and training steps run in parallel as before.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger(__name__)

_LOCK = threading.RLock()


@contextmanager
def model_loading(what: str = "a model") -> Iterator[None]:
    """Hold the process-wide model-loading lock (waiting, with a log line, while another load runs)."""
    if not _LOCK.acquire(blocking=False):
        log.info("Waiting for another model load to finish before loading %s", what)
        _LOCK.acquire()
    try:
        yield
    finally:
        _LOCK.release()
