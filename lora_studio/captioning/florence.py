"""Florence-2 captions: a short caption, a detailed one, or a paragraph, with plain transformers.

The ``florence-community/Florence-2-base`` and ``-large`` checkpoints load with
``Florence2ForConditionalGeneration`` and ``AutoProcessor`` (no ``trust_remote_code``); Microsoft's original
``microsoft/Florence-2-*`` repositories need their own code and are refused with a sentence naming the
converted ones. Each image is resized once to the processor's square input (768 px for the real models).
The answer goes through the processor's ``post_process_generation`` when its ``post_processor_config``
knows plain text, else the generated tokens are decoded directly (the same text).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from PIL import Image

from lora_studio.captioning.generative import GenerativeCaptioner, resize_to
from lora_studio.errors import ModelLoadError

log = logging.getLogger(__name__)

DEFAULT_FLORENCE = "florence-community/Florence-2-large"
BASE_FLORENCE = "florence-community/Florence-2-base"
FLORENCE_TASKS = {"caption": "<CAPTION>", "detailed": "<DETAILED_CAPTION>", "more_detailed": "<MORE_DETAILED_CAPTION>"}


class FlorenceCaptioner(GenerativeCaptioner):
    """Florence-2 with one of ``FLORENCE_TASKS`` (caption, detailed, more_detailed)."""

    name = "Florence-2"
    what = "Florence-2 model"

    def __init__(self, model: str | os.PathLike = DEFAULT_FLORENCE, task: str = "caption", **kwargs: Any):
        kwargs.setdefault("num_beams", 3)
        super().__init__(model, **kwargs)
        if task not in FLORENCE_TASKS:
            raise ValueError(f"Florence-2 task '{task}' is not one of {', '.join(FLORENCE_TASKS)}.")
        self.task = task

    def _load_parts(self, ref: str, model_kwargs: dict[str, Any]):
        from transformers import AutoProcessor, Florence2ForConditionalGeneration

        if ref.lower().startswith("microsoft/florence-2"):
            raise ModelLoadError(
                f"'{ref}' needs its own remote code, which LoRA Studio never runs; use the converted checkpoint "
                f"'{ref.replace('microsoft/', 'florence-community/')}' instead.")

        processor = AutoProcessor.from_pretrained(ref)
        model = Florence2ForConditionalGeneration.from_pretrained(ref, **model_kwargs)
        return model, processor

    def prepare(self, image: Image.Image) -> Image.Image:
        size = self._processor.image_processor.size
        return resize_to(image, size["width"], size["height"])

    def _caption_batch(self, images: list[Image.Image]) -> list[str]:
        token = FLORENCE_TASKS[self.task]
        inputs = self._processor(text=[token] * len(images), images=images, return_tensors="pt", do_resize=False)
        output = self._generate(self._to_model(inputs))
        if "pure_text" not in (self._processor.post_processor_config or {}):
            return [" ".join(t.split()) for t in self._processor.batch_decode(output, skip_special_tokens=True)]
        texts = []
        for raw in self._processor.batch_decode(output, skip_special_tokens=False):
            text = self._processor.post_process_generation(raw, task=token, image_size=images[0].size)[token]
            texts.append(" ".join(str(text).split()))
        return texts
