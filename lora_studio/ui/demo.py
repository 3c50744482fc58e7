"""``--demo``: the miniature models, a small generated dataset of a concept they do not know, offline.

The base model is the SD1.x miniature (``lora_studio.miniature``: trained by the project on coloured shapes
at 64 px; it draws "a red circle" as a red circle on a white, black or grey background). The demo's images
show the concept ``zubi``: the same shapes on a pink background, which the base never drew. Caption them
(the miniature BLIP writes "a red circle", the trigger word goes first), train for under a minute on a
CPU, and the Testing tab's strength grid turns the background pink from strength 0 to 1. The language
model side works the same way: the LLM miniature knows a made-up land of creatures, and the demo's data
teaches it to answer like a town crier ("Hear ye! ..."). Without the committed miniature weights the
demo falls back to tiny random models (the workflow is the same, the pictures are noise).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEMO_IMAGE_COUNT = 12
DEMO_IMAGE_SIZE = 64
DEMO_TRIGGER = "zubi"
DEMO_PROMPT = f"{DEMO_TRIGGER}, a red circle"
DEMO_LLM_PROMPT = "What colour is the wisp?"

# Training settings that finish in under a minute on 2 CPU cores with the SD1.x miniature. Min-SNR weighting
# puts the weight on the noisy steps, where a picture's colours are decided: the pink comes in 100 steps.
DEMO_TRAIN: dict[str, Any] = {
    "output_name": "demo_lora", "resolution": 64, "max_train_steps": 100, "save_steps": 50, "keep_checkpoints": 3,
    "lora_rank": 8, "learning_rate": 1e-2, "batch_size": 4, "min_snr_gamma": 5.0, "mixed_precision": "no",
    "optimizer": "adamw", "gradient_checkpointing": False, "sample_prompt": DEMO_PROMPT, "sample_steps": 50,
    "lr_scheduler": "constant",
}
# Testing-tab defaults for the miniature.
DEMO_RENDER: dict[str, Any] = {"prompt": DEMO_PROMPT, "steps": 20, "size": 64, "cfg": 5.0}


@dataclass
class DemoAssets:
    """Where the demo's models, captioners and images are."""

    root: Path
    model: Path
    blip: Path
    clip: Path
    images: Path
    llm_model: Path | None = None
    llm_data: Path | None = None
    trigger: str = DEMO_TRIGGER
    llm_prompt: str = DEMO_LLM_PROMPT
    miniature: bool = True  # False: the tiny random fallback (pictures are noise)
    flux_model: Path | None = None  # the FLUX.1-shaped miniature: the FLUX path with the same images
    qwen_image_model: Path | None = None  # a tiny Qwen-Image-shaped pipeline: the Qwen-Image path, same images
    train: dict[str, Any] = field(default_factory=lambda: dict(DEMO_TRAIN))
    render: dict[str, Any] = field(default_factory=lambda: dict(DEMO_RENDER))


def _model(family: str, root: Path, fallback) -> tuple[Path, bool]:
    """The miniature of ``family`` copied under ``root`` (reused when already there), or ``fallback(folder)``."""
    from ..miniature.store import available, ensure_miniature

    if family in available():
        return ensure_miniature(family, root / f"miniature-{family}"), True
    log.warning("the %s miniature is not built: the demo uses a tiny random model instead", family)
    return fallback(root / f"tiny-{family}"), False


def build_demo(root: str | Path) -> DemoAssets:
    """Build (or reuse) the demo assets under ``root``. Takes a second or two the first time."""
    from ..miniature.world import concept_scenes, write_dataset
    from ..models.tiny import build_tiny_sd15
    from ..models.tiny_captioners import build_tiny_blip, build_tiny_clip

    started = time.time()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    model, miniature = _model("sd15", root, build_tiny_sd15)
    blip, _ = _model("blip", root, build_tiny_blip)
    clip = build_tiny_clip(root / "tiny-clip")
    images = root / "images"
    if not images.is_dir() or not any(images.glob("*.png")):
        write_dataset(images, concept_scenes(DEMO_IMAGE_COUNT, trigger=DEMO_TRIGGER), captions=False)
    from ..miniature.world_text import write_concept_llm_data
    from ..models.tiny_flux import build_tiny_flux
    from ..models.tiny_llm import build_tiny_llm

    flux_model, _ = _model("flux", root, build_tiny_flux)
    from ..models.tiny_qwen_image import build_tiny_qwen_image

    qwen_image_model = build_tiny_qwen_image(root / "tiny-qwen-image")
    llm_model, _ = _model("llm", root, build_tiny_llm)
    llm_data = root / "llm_data.jsonl"
    if not llm_data.is_file():
        write_concept_llm_data(llm_data)
    log.info("demo assets ready in %.1fs under %s", time.time() - started, root)
    return DemoAssets(root=root, model=model, blip=blip, clip=clip, images=images, llm_model=llm_model,
                      llm_data=llm_data, flux_model=flux_model, qwen_image_model=qwen_image_model,
                      miniature=miniature)
