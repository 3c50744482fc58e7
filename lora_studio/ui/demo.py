"""``--demo``: a tiny offline model, tiny captioners and a small generated dataset, so the whole flow
(dataset, captioning, training, testing) can be clicked through on any CPU in under a minute, with no
download. The pictures it makes are noise: the demo shows the workflow, not image quality.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEMO_IMAGE_COUNT = 8
DEMO_IMAGE_SIZE = 64
DEMO_TRIGGER = "demo style"

# Training settings that finish in seconds on a CPU with the tiny model.
DEMO_TRAIN: dict[str, Any] = {
    "output_name": "demo_lora", "resolution": 64, "max_train_steps": 20, "save_steps": 10, "keep_checkpoints": 3,
    "lora_rank": 4, "learning_rate": 1e-3, "batch_size": 2, "mixed_precision": "no", "optimizer": "adamw",
    "gradient_checkpointing": False, "sample_prompt": f"{DEMO_TRIGGER}, a red circle", "sample_steps": 10,
    "lr_scheduler": "constant",
}
# Testing-tab defaults for the tiny model.
DEMO_RENDER: dict[str, Any] = {"prompt": f"{DEMO_TRIGGER}, a red circle", "steps": 8, "size": 64, "cfg": 5.0}


@dataclass
class DemoAssets:
    """Where the demo's model, captioners and images are."""

    root: Path
    model: Path
    blip: Path
    clip: Path
    images: Path
    llm_model: Path | None = None
    llm_data: Path | None = None
    flux_model: Path | None = None  # a tiny FLUX.1-shaped pipeline: the FLUX path with the same images
    train: dict[str, Any] = field(default_factory=lambda: dict(DEMO_TRAIN))
    render: dict[str, Any] = field(default_factory=lambda: dict(DEMO_RENDER))


def build_demo(root: str | Path) -> DemoAssets:
    """Build (or reuse) the demo assets under ``root``. Takes a few seconds the first time."""
    from ..models.tiny import build_tiny_sd15, make_demo_images
    from ..models.tiny_captioners import build_tiny_blip, build_tiny_clip

    started = time.time()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    model = build_tiny_sd15(root / "tiny-sd15")
    blip = build_tiny_blip(root / "tiny-blip")
    clip = build_tiny_clip(root / "tiny-clip")
    images = root / "images"
    if not images.is_dir() or not any(images.glob("*.png")):
        make_demo_images(images, count=DEMO_IMAGE_COUNT, size=DEMO_IMAGE_SIZE, with_captions=False)
    from ..models.tiny_flux import build_tiny_flux
    from ..models.tiny_llm import build_tiny_llm, make_demo_llm_data

    flux_model = build_tiny_flux(root / "tiny-flux")
    llm_model = build_tiny_llm(root / "tiny-llm")
    llm_data = root / "llm_data.jsonl"
    if not llm_data.is_file():
        make_demo_llm_data(llm_data)
    log.info("demo assets ready in %.1fs under %s", time.time() - started, root)
    return DemoAssets(root=root, model=model, blip=blip, clip=clip, images=images, llm_model=llm_model,
                      llm_data=llm_data, flux_model=flux_model)
