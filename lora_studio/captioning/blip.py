"""BLIP image captions ("a woman in a red dress standing on a beach") via transformers.

The default model is ``Salesforce/blip-image-captioning-base`` (``-large`` is better and slower); a local
folder saved with ``save_pretrained`` works too. An optional conditional prefix ("a painting of") makes
BLIP continue that text. The image processor is ``BlipImageProcessorPil`` so torchvision is not needed.
"""

from __future__ import annotations

import logging
import os
import re

from PIL import Image

from lora_studio.captioning.base import Captioner, free_memory, pick_device
from lora_studio.captioning import DEFAULT_BLIP  # noqa: F401  (re-exported)
from lora_studio.captioning.loading import load_model_part

log = logging.getLogger(__name__)

LARGE_BLIP = "Salesforce/blip-image-captioning-large"
# BLIP's well-known filler words ("arafed", "araffe") that mean nothing.
_FILLER = re.compile(r"\b(?:ara+f+\w*|arafed)\b\s*", re.IGNORECASE)


def clean_caption(text: str, prefix: str | None = None) -> str:
    """Tidy a generated caption: filler words, repeated spaces, stray punctuation."""
    text = _FILLER.sub("", text)
    text = re.sub(r"\s+", " ", text).strip(" ,.")
    text = re.sub(r"\s+([,.])", r"\1", text)
    if prefix and not text.lower().startswith(prefix.strip().lower()):
        text = f"{prefix.strip()} {text}".strip()
    return text


def _image_processor_class():
    import transformers

    return getattr(transformers, "BlipImageProcessorPil", None) or transformers.BlipImageProcessor


class BlipCaptioner(Captioner):
    """Caption images with a BLIP captioning model (loaded on first use, released after the batch)."""

    name = "BLIP"

    def __init__(self, model: str | os.PathLike = DEFAULT_BLIP, prefix: str | None = None,
                 device: str | None = None, batch_size: int = 4, max_new_tokens: int = 40,
                 num_beams: int = 3, repetition_penalty: float = 1.3):
        super().__init__(batch_size=batch_size, device=device)
        self.model_ref = str(model)
        self.prefix = (prefix or "").strip() or None
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        self.repetition_penalty = repetition_penalty
        self._model = None
        self._processor = None

    def load(self, report=None) -> None:
        if self.loaded:
            return
        import torch
        from transformers import AutoTokenizer, BlipForConditionalGeneration, BlipProcessor

        def _load(ref: str):
            processor = BlipProcessor(image_processor=_image_processor_class().from_pretrained(ref),
                                      tokenizer=AutoTokenizer.from_pretrained(ref))
            model = BlipForConditionalGeneration.from_pretrained(ref)
            return processor, model

        processor, model = load_model_part(_load, self.model_ref, "BLIP captioning model", report)
        device = pick_device(self.device)
        dtype = torch.float16 if device == "cuda" else torch.float32
        self._model = model.to(device=device, dtype=dtype).eval()
        self._processor = processor
        self._device, self._dtype = device, dtype
        log.info("Loaded BLIP from %s on %s", self.model_ref, device)

    def release(self) -> None:
        self._model = None
        self._processor = None
        free_memory()

    def _caption_batch(self, images: list[Image.Image]) -> list[str]:
        import torch

        text = [self.prefix] * len(images) if self.prefix else None
        inputs = self._processor(images=images, text=text, return_tensors="pt")
        inputs = {k: (v.to(self._device, self._dtype) if v.is_floating_point() else v.to(self._device))
                  for k, v in inputs.items()}
        with torch.inference_mode():
            out = self._model.generate(**inputs, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams,
                                       repetition_penalty=self.repetition_penalty)
        texts = self._processor.tokenizer.batch_decode(out, skip_special_tokens=True)
        return [clean_caption(t, self.prefix) for t in texts]
