"""WD14 / wd-eva02 booru taggers through onnxruntime: "1girl, long hair, smile, outdoors".

A tagger is ``model.onnx`` + ``selected_tags.csv`` (``tag_id,name,category,count``; category 0 general,
4 character, 9 rating), in a local folder or a hub repository such as ``SmilingWolf/wd-eva02-large-tagger-v3``.
The model takes NHWC float images, BGR, on the 0-255 scale, square (448 px for the real ones): each image
is put on a white square canvas and resized once to the model's side. Tags whose score passes the general
or character threshold are kept, character tags first, each group by score; rating tags ("general",
"sensitive", ...) only with ``include_rating`` (the best one, first). Underscores become spaces except in
kaomoji such as ``^_^``; ``exclude`` drops tags (written either way). onnxruntime uses the CUDA provider when
it has one and the device is a GPU, else the CPU (fast enough for a tagger).
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from lora_studio.captioning.base import Captioner, free_memory, pick_device
from lora_studio.captioning.loading import load_model_part
from lora_studio.data.tags import join_tags
from lora_studio.errors import ModelLoadError

log = logging.getLogger(__name__)

DEFAULT_WD14 = "SmilingWolf/wd-eva02-large-tagger-v3"
WD14_MODELS = ("SmilingWolf/wd-eva02-large-tagger-v3", "SmilingWolf/wd-vit-large-tagger-v3",
               "SmilingWolf/wd-swinv2-tagger-v3", "SmilingWolf/wd-vit-tagger-v3")
MODEL_FILE, TAGS_FILE = "model.onnx", "selected_tags.csv"
GENERAL, CHARACTER, RATING = 0, 4, 9
KAOMOJI = {"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@",
           "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"}


@dataclass(frozen=True)
class TagList:
    """The tagger's tags, in its output order, with their categories."""

    names: tuple[str, ...]
    categories: tuple[int, ...]

    @classmethod
    def read(cls, path: str | os.PathLike) -> "TagList":
        with open(path, encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh))
        if not rows or "name" not in rows[0] or "category" not in rows[0]:
            raise ValueError(f"{Path(path).name} has no 'name' and 'category' columns")
        return cls(tuple(r["name"] for r in rows), tuple(int(r["category"]) for r in rows))


def tag_text(name: str, underscores_to_spaces: bool = True) -> str:
    """A tag as written in a caption: underscores to spaces, except in kaomoji."""
    return name.replace("_", " ") if underscores_to_spaces and name not in KAOMOJI else name


def _model_files(ref: str) -> tuple[Path, Path]:
    folder = Path(ref).expanduser()
    if folder.is_dir():
        model, tags = folder / MODEL_FILE, folder / TAGS_FILE
        if not model.is_file() or not tags.is_file():
            raise FileNotFoundError(f"it needs {MODEL_FILE} and {TAGS_FILE}")
        return model, tags
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(ref, MODEL_FILE)), Path(hf_hub_download(ref, TAGS_FILE))


def _session(model_path: Path, device: str):
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(model_path), sess_options=options, providers=providers)


class WD14Tagger(Captioner):
    """Booru tags from a WD14-style ONNX tagger."""

    name = "WD14 tagger"
    kind = "tags"

    def __init__(self, model: str | os.PathLike = DEFAULT_WD14, general_threshold: float = 0.35,
                 character_threshold: float = 0.85, exclude: Iterable[str] = (), underscores_to_spaces: bool = True,
                 include_rating: bool = False, max_tags: int = 0, device: str | None = None, batch_size: int = 8):
        super().__init__(batch_size=batch_size, device=device)
        self.model_ref = str(model)
        for label, value in (("general", general_threshold), ("character", character_threshold)):
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"The {label} tag threshold {value} is not between 0 and 1.")
        self.general_threshold = float(general_threshold)
        self.character_threshold = float(character_threshold)
        self.exclude = {t.strip().lower().replace("_", " ") for t in exclude if t and t.strip()}
        self.underscores_to_spaces = bool(underscores_to_spaces)
        self.include_rating = bool(include_rating)
        self.max_tags = max(0, int(max_tags))
        self._model = None
        self._tags: TagList | None = None

    def load(self, report=None) -> None:
        if self.loaded:
            return
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise ModelLoadError("The WD14 tagger needs the onnxruntime package; install it with "
                                 "'pip install -r requirements.txt'.") from exc

        def _load(ref: str):
            model_path, tags_path = _model_files(ref)
            return _session(model_path, pick_device(self.device)), TagList.read(tags_path)

        session, tags = load_model_part(_load, self.model_ref, "WD14 tagger", report)
        shape = session.get_inputs()[0].shape
        if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int):
            raise ModelLoadError(f"The WD14 tagger '{self.model_ref}' takes input of shape {shape}, not the "
                                 "(batch, side, side, 3) images of a WD14 tagger.")
        scored = session.get_outputs()[0].shape[-1]
        if isinstance(scored, int) and scored != len(tags.names):
            raise ModelLoadError(f"The WD14 tagger '{self.model_ref}' scores {scored} tags but its {TAGS_FILE} "
                                 f"lists {len(tags.names)}; the two files do not belong together.")
        self._model, self._tags = session, tags
        self._side = int(shape[1])
        self._one_at_a_time = shape[0] == 1  # a model exported with a fixed batch of one
        log.info("Loaded WD14 tagger %s (%d tags, %d px)", self.model_ref, len(tags.names), self._side)

    def release(self) -> None:
        self._model = None
        self._tags = None
        free_memory()

    def prepare(self, image: Image.Image) -> Image.Image:
        side = max(image.size)
        canvas = Image.new("RGB", (side, side), (255, 255, 255))
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        if side != self._side:
            canvas = canvas.resize((self._side, self._side), Image.Resampling.BICUBIC, reducing_gap=3.0)
        return canvas

    def scores(self, images: list[Image.Image]) -> np.ndarray:
        """Scores (images x tags) for images already ``prepare``d."""
        batch = np.stack([np.asarray(img, dtype=np.float32)[:, :, ::-1] for img in images])  # RGB -> BGR
        name = self._model.get_inputs()[0].name
        if self._one_at_a_time:
            return np.concatenate([self._model.run(None, {name: batch[i:i + 1]})[0] for i in range(len(batch))])
        return self._model.run(None, {name: batch})[0]

    def select(self, scores: np.ndarray) -> str:
        """The caption for one image's scores (thresholds, order, exclusions, rating)."""
        tags = self._tags
        picked: dict[int, list[tuple[float, str]]] = {GENERAL: [], CHARACTER: [], RATING: []}
        for name, category, score in zip(tags.names, tags.categories, scores.tolist()):
            if category not in picked:
                continue
            text = tag_text(name, self.underscores_to_spaces)
            if text.lower().replace("_", " ") in self.exclude:
                continue
            limit = {GENERAL: self.general_threshold, CHARACTER: self.character_threshold}.get(category, 0.0)
            if score >= limit:
                picked[category].append((score, text))
        ordered = [t for _, t in sorted(picked[CHARACTER], reverse=True)]
        ordered += [t for _, t in sorted(picked[GENERAL], reverse=True)]
        if self.max_tags:
            ordered = ordered[: self.max_tags]
        if self.include_rating and picked[RATING]:
            ordered.insert(0, max(picked[RATING])[1])
        return join_tags(ordered)

    def _caption_batch(self, images: list[Image.Image]) -> list[str]:
        return [self.select(row) for row in self.scores(images)]
