"""``--demo``: the miniature models, a small generated dataset of a concept they do not know, offline.

The base models are the image miniatures (``lora_studio.miniature``: trained by the project on coloured shapes
at 64 px; "a red circle" is drawn as a red circle on a white, black or grey background): SD1.x first, then
each other family whose miniature is committed (``DEMO_FAMILIES``). The demo's images show the concept
``zubi``: the same shapes on a pink background, which no base ever drew. Caption them (the miniature BLIP
writes "a red circle", the trigger word goes first), train for under a minute on a CPU, and the Testing tab's
strength grid turns the background pink from strength 0 to 1. Each family gets its own training and render
settings (``demo_train_settings``, ``demo_render_settings``): the Training and Testing tabs switch to them
when one of the demo's models is picked. The language model side works the same way: the LLM miniature
knows a made-up land of creatures, and the demo's data teaches it to answer like a town crier ("Hear ye!
..."). A family whose miniature is not built falls back to a tiny random model (the workflow is the same,
the pictures are noise).
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

DEMO_IMAGE_COUNT = 12
DEMO_IMAGE_SIZE = 64
DEMO_TRIGGER = "zubi"
DEMO_PROMPT = f"{DEMO_TRIGGER}, a red circle"
DEMO_LLM_PROMPT = "What colour is the wisp?"
DEFAULT_FAMILY = "sd15"

# Training settings that finish in under a minute on 2 CPU cores with the SD1.x miniature. Min-SNR weighting
# puts the weight on the noisy steps, where a picture's colours are decided: the pink comes in 100 steps.
DEMO_TRAIN: dict[str, Any] = {
    "output_name": "demo_lora", "resolution": 64, "max_train_steps": 100, "save_steps": 50, "keep_checkpoints": 3,
    "lora_rank": 8, "learning_rate": 1e-2, "batch_size": 4, "min_snr_gamma": 5.0, "mixed_precision": "no",
    "optimizer": "adamw", "gradient_checkpointing": False, "sample_prompt": DEMO_PROMPT, "sample_steps": 50,
    "lr_scheduler": "constant",
}
# Testing-tab defaults for the SD1.x miniature (20 DDPM steps, CFG 5, its 64 px).
DEMO_RENDER: dict[str, Any] = {"prompt": DEMO_PROMPT, "steps": 20, "size": 64, "cfg": 5.0}

# Flow-matching families: min-SNR is a DDPM weighting (their trainers do not use it), so it is off; the learning
# rates, steps and noise levels are those their proof-of-learning tests measured (tests/test_proof_of_learning.py).
_FLOW = {"min_snr_gamma": None, "learning_rate": 2e-2}
_SHIFT3 = {"min_snr_gamma": None, "learning_rate": 1e-2, "timestep_sampling": "shift", "discrete_flow_shift": 3.0}
_CFG2 = {"cfg": 2.0}  # undistilled miniatures that draw best at CFG 2 (stronger guidance over-saturates them)


def _tiny(module: str, name: str, **kwargs: Any) -> Callable[[Path], Path]:
    """The tiny random-model builder ``lora_studio.models.<module>.<name>(folder, **kwargs)``, imported when used."""
    def build(folder: Path) -> Path:
        return getattr(importlib.import_module(f"lora_studio.models.{module}"), name)(folder, **kwargs)

    return build


@dataclass(frozen=True)
class DemoFamily:
    """One family the demo offers: the tiny random model to build when its miniature is missing, and how its
    settings differ from ``DEMO_TRAIN`` and ``DEMO_RENDER``."""

    fallback: Callable[[Path], Path]
    train: dict[str, Any] = field(default_factory=dict)
    render: dict[str, Any] = field(default_factory=dict)


# The image families the demo offers, in the order the base-model list shows them (SD1.x first: the default).
DEMO_FAMILIES: dict[str, DemoFamily] = {
    "sd15": DemoFamily(_tiny("tiny", "build_tiny_sd15")),
    "sd15_v": DemoFamily(_tiny("tiny", "build_tiny_sd15", prediction_type="v_prediction")),
    "sdxl": DemoFamily(_tiny("tiny", "build_tiny_sdxl")),
    "flux": DemoFamily(_tiny("tiny_flux", "build_tiny_flux"), _FLOW),
    "flux2": DemoFamily(_tiny("tiny_flux2", "build_tiny_flux2_klein"), _FLOW, _CFG2),
    "z_image": DemoFamily(_tiny("tiny_z_image", "build_tiny_z_image"),
                          {**_SHIFT3, "max_train_steps": 300, "save_steps": 150, "sample_steps": 150}, _CFG2),
    "sd3": DemoFamily(_tiny("tiny_sd3", "build_tiny_sd3"),
                      {**_SHIFT3, "max_train_steps": 200, "save_steps": 100, "sample_steps": 100}, _CFG2),
    "qwen_image": DemoFamily(_tiny("tiny_qwen_image", "build_tiny_qwen_image"),
                             {**_SHIFT3, "timestep_sampling": "flux_shift", "max_train_steps": 300, "save_steps": 150,
                              "sample_steps": 150}, _CFG2),
}


def demo_train_settings(family: str) -> dict[str, Any]:
    """The Training tab's demo settings for ``family`` (``DEMO_TRAIN`` with the family's changes)."""
    return {**DEMO_TRAIN, **DEMO_FAMILIES[family].train}


def demo_render_settings(family: str) -> dict[str, Any]:
    """The Testing tab's demo settings for ``family``: prompt, steps, size, cfg."""
    return {**DEMO_RENDER, **DEMO_FAMILIES[family].render}


def demo_form_values(family: str) -> dict[str, Any]:
    """Every training setting some demo family sets, as ``family`` wants it (``TrainConfig``'s default where it
    sets nothing): switching from Z-Image to FLUX also puts back the noise levels Z-Image changed."""
    from ..config import TrainConfig

    keys = set(DEMO_TRAIN).union(*(f.train for f in DEMO_FAMILIES.values()))
    defaults = {f.name: getattr(TrainConfig(), f.name) for f in fields(TrainConfig) if f.name in keys}
    return {**defaults, **demo_train_settings(family)}


@dataclass
class DemoAssets:
    """Where the demo's models, captioners and images are."""

    root: Path
    models: dict[str, Path]  # image family -> its model folder (the miniature, or the tiny random fallback)
    blip: Path
    clip: Path
    images: Path
    llm_model: Path | None = None
    llm_data: Path | None = None
    trigger: str = DEMO_TRIGGER
    llm_prompt: str = DEMO_LLM_PROMPT
    miniatures: tuple[str, ...] = ()  # the families whose committed miniature is used (the others draw noise)

    @property
    def model(self) -> Path:
        """The default base model (SD1.x)."""
        return self.models[DEFAULT_FAMILY]

    @property
    def miniature(self) -> bool:
        """Whether the default base model is the miniature (False: the tiny random fallback)."""
        return DEFAULT_FAMILY in self.miniatures

    @property
    def flux_model(self) -> Path | None:
        return self.models.get("flux")

    @property
    def qwen_image_model(self) -> Path | None:
        return self.models.get("qwen_image")

    @property
    def train(self) -> dict[str, Any]:
        return demo_train_settings(DEFAULT_FAMILY)

    @property
    def render(self) -> dict[str, Any]:
        return demo_render_settings(DEFAULT_FAMILY)

    def family_of(self, base_model: str | Path | None) -> str | None:
        """The demo family whose model ``base_model`` is, or None for any other model."""
        if not base_model or not str(base_model).strip():
            return None
        wanted = Path(str(base_model).strip()).expanduser().resolve()
        return next((fam for fam, path in self.models.items() if path.resolve() == wanted), None)

    def model_paths(self) -> list[Path]:
        """The base models to offer: SD1.x, the language model, then the other image families."""
        first = [self.model] + ([self.llm_model] if self.llm_model is not None else [])
        return first + [p for fam, p in self.models.items() if fam != DEFAULT_FAMILY]


def _model(family: str, root: Path, fallback: Callable[[Path], Path]) -> tuple[Path, bool]:
    """The miniature of ``family`` copied under ``root`` (reused when already there), or ``fallback(folder)``."""
    from ..miniature.store import available, ensure_miniature

    if family in available():
        return ensure_miniature(family, root / f"miniature-{family}"), True
    log.warning("the %s miniature is not built: the demo uses a tiny random model instead", family)
    return fallback(root / f"tiny-{family}"), False


def build_demo(root: str | Path) -> DemoAssets:
    """Build (or reuse) the demo assets under ``root``. Takes a few seconds the first time."""
    from ..miniature.world import concept_scenes, write_dataset
    from ..miniature.world_text import write_concept_llm_data
    from ..models.tiny_captioners import build_tiny_blip, build_tiny_clip
    from ..models.tiny_llm import build_tiny_llm

    started = time.time()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    models: dict[str, Path] = {}
    miniatures: list[str] = []
    for family, entry in DEMO_FAMILIES.items():
        models[family], is_miniature = _model(family, root, entry.fallback)
        if is_miniature:
            miniatures.append(family)
    blip, _ = _model("blip", root, build_tiny_blip)
    clip = build_tiny_clip(root / "tiny-clip")
    images = root / "images"
    if not images.is_dir() or not any(images.glob("*.png")):
        write_dataset(images, concept_scenes(DEMO_IMAGE_COUNT, trigger=DEMO_TRIGGER), captions=False)
    llm_model, _ = _model("llm", root, build_tiny_llm)
    llm_data = root / "llm_data.jsonl"
    if not llm_data.is_file():
        write_concept_llm_data(llm_data)
    log.info("demo assets ready in %.1fs under %s", time.time() - started, root)
    return DemoAssets(root=root, models=models, blip=blip, clip=clip, images=images, llm_model=llm_model,
                      llm_data=llm_data, miniatures=tuple(miniatures))
