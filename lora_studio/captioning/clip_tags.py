"""CLIP style tags: rank the built-in vocabulary (medium, art style, lighting, colour) for each image.

For every category the term whose CLIP text embedding is closest to the image embedding wins, so an image
gets e.g. "watercolor painting, impressionist, soft lighting, pastel colors", ready to follow a BLIP
sentence. The vocabulary's text embeddings are computed once per load. ``rank`` gives the full scores
for a UI.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping, Sequence

from PIL import Image

from lora_studio.captioning.base import Captioner, free_memory, pick_device
from lora_studio.captioning import DEFAULT_CLIP  # noqa: F401  (re-exported)
from lora_studio.captioning.loading import load_model_part
from lora_studio.captioning.vocabulary import STYLE_VOCABULARY
from lora_studio.data.tags import join_tags

log = logging.getLogger(__name__)



def _features(out):
    """transformers 4 returns a tensor from ``get_*_features``; 5 returns an output with ``pooler_output``."""
    import torch

    return out if torch.is_tensor(out) else out.pooler_output


def _image_processor_class():
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


class ClipStyleTagger(Captioner):
    """Tags from a fixed vocabulary ranked by CLIP image-text similarity (``per_category`` per category)."""

    name = "CLIP style tags"
    kind = "tags"

    def __init__(self, model: str | os.PathLike = DEFAULT_CLIP,
                 vocabulary: Mapping[str, Sequence[str]] | None = None, per_category: int = 1,
                 categories: Sequence[str] | None = None, device: str | None = None, batch_size: int = 8):
        super().__init__(batch_size=batch_size, device=device)
        self.model_ref = str(model)
        vocab = dict(vocabulary or STYLE_VOCABULARY)
        if categories is not None:
            unknown = [c for c in categories if c not in vocab]
            if unknown:
                raise ValueError(f"Unknown style categories {unknown}; known: {list(vocab)}")
            vocab = {c: vocab[c] for c in categories}
        self.vocabulary = {k: tuple(v) for k, v in vocab.items() if v}
        self.per_category = max(1, int(per_category))
        self._model = None
        self._processor = None
        self._tokenizer = None
        self._text = None  # {category: normalised text embeddings}

    def load(self, report=None) -> None:
        if self.loaded:
            return
        import torch
        from transformers import AutoTokenizer, CLIPModel

        def _load(ref: str):
            return (CLIPModel.from_pretrained(ref), _image_processor_class().from_pretrained(ref),
                    AutoTokenizer.from_pretrained(ref))

        model, processor, tokenizer = load_model_part(_load, self.model_ref, "CLIP model", report)
        device = pick_device(self.device)
        self._device = device
        self._dtype = torch.float16 if device == "cuda" else torch.float32
        self._model = model.to(device=device, dtype=self._dtype).eval()
        self._processor, self._tokenizer = processor, tokenizer
        self._text = {}
        with torch.inference_mode():
            for category, terms in self.vocabulary.items():
                tokens = tokenizer(list(terms), padding=True, truncation=True, return_tensors="pt").to(device)
                emb = _features(self._model.get_text_features(**tokens)).float()
                self._text[category] = emb / emb.norm(dim=-1, keepdim=True)
        log.info("Loaded CLIP from %s on %s", self.model_ref, device)

    def release(self) -> None:
        self._model = self._processor = self._tokenizer = self._text = None
        free_memory()

    def _scores(self, images: list[Image.Image]):
        import torch

        pixels = self._processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            emb = _features(self._model.get_image_features(
                pixel_values=pixels.to(self._device, self._dtype))).float()
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return {category: emb @ text.T for category, text in self._text.items()}

    def rank_batch(self, images: list[Image.Image]) -> list[dict[str, list[tuple[str, float]]]]:
        """Per image, per category: every term with its cosine similarity, best first."""
        scores = self._scores(images)
        out: list[dict[str, list[tuple[str, float]]]] = [{} for _ in images]
        for category, sims in scores.items():
            terms = self.vocabulary[category]
            for i in range(len(images)):
                row = sims[i].tolist()
                out[i][category] = sorted(zip(terms, row), key=lambda kv: -kv[1])
        return out

    def _caption_batch(self, images: list[Image.Image]) -> list[str]:
        ranked = self.rank_batch(images)
        return [join_tags(term for category in self.vocabulary for term, _ in r[category][: self.per_category])
                for r in ranked]
