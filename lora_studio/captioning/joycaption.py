"""JoyCaption: descriptive captions, training prompts or booru-like tags, of a chosen length.

JoyCaption's llava-format checkpoints (``fancyfeast/llama-joycaption-beta-one-hf-llava``) load with
transformers' ``LlavaForConditionalGeneration`` and ``AutoProcessor``. The request is one of the prompts
JoyCaption was trained on (``CAPTION_TYPES``), with a length word ("short", "long", ...) or a number of
words. The chat template already starts with the BOS token, so the prompt is tokenized without adding a
second one; the image token is put in the user message when the template does not do it. Each image is
resized once to the vision tower's input (384 px for the real model). JoyCaption's authors sample with
temperature 0.6 and top-p 0.9; ``temperature=0`` gives the same caption on every run.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from PIL import Image

from lora_studio.captioning.generative import GenerativeCaptioner, resize_to

log = logging.getLogger(__name__)

DEFAULT_JOYCAPTION = "fancyfeast/llama-joycaption-beta-one-hf-llava"
SYSTEM_PROMPT = "You are a helpful image captioner."
# caption type -> its request: plain, with "{length}" (a length word), with "{words}" (a number of words).
CAPTION_TYPES: dict[str, tuple[str, str, str]] = {
    "descriptive": ("Write a detailed description for this image.",
                    "Write a {length} detailed description for this image.",
                    "Write a detailed description for this image in {words} words or less."),
    "casual": ("Write a descriptive caption for this image in a casual tone.",
               "Write a {length} descriptive caption for this image in a casual tone.",
               "Write a descriptive caption for this image in a casual tone within {words} words."),
    "training_prompt": ("Write a stable diffusion prompt for this image.",
                        "Write a {length} stable diffusion prompt for this image.",
                        "Write a stable diffusion prompt for this image within {words} words."),
    "midjourney": ("Write a MidJourney prompt for this image.",
                   "Write a {length} MidJourney prompt for this image.",
                   "Write a MidJourney prompt for this image within {words} words."),
    "booru_tags": ("Write a list of Booru tags for this image.",
                   "Write a {length} list of Booru tags for this image.",
                   "Write a list of Booru tags for this image within {words} words."),
    "booru_like_tags": ("Write a list of Booru-like tags for this image.",
                        "Write a {length} list of Booru-like tags for this image.",
                        "Write a list of Booru-like tags for this image within {words} words."),
}
CAPTION_LENGTHS = ("any", "very short", "short", "medium-length", "long", "very long")
TAG_TYPES = ("booru_tags", "booru_like_tags")


def joycaption_prompt(caption_type: str = "descriptive", length: str | int = "any") -> str:
    """The request for ``caption_type`` and ``length`` (a word of ``CAPTION_LENGTHS`` or a number of words)."""
    if caption_type not in CAPTION_TYPES:
        raise ValueError(f"JoyCaption caption type '{caption_type}' is not one of {', '.join(CAPTION_TYPES)}.")
    plain, with_length, with_words = CAPTION_TYPES[caption_type]
    text = str(length).strip().lower()
    if text in ("", "any"):
        return plain
    if text.isdigit():
        return with_words.format(words=int(text))
    if text not in CAPTION_LENGTHS:
        raise ValueError(f"JoyCaption length '{length}' is not a number of words nor one of "
                         f"{', '.join(CAPTION_LENGTHS)}.")
    return with_length.format(length=text)


class JoyCaptioner(GenerativeCaptioner):
    """JoyCaption (llava format) writing ``caption_type`` captions of ``length``, or answering ``instruction``."""

    name = "JoyCaption"
    what = "JoyCaption model"

    def __init__(self, model: str | os.PathLike = DEFAULT_JOYCAPTION, caption_type: str = "descriptive",
                 length: str | int = "any", instruction: str | None = None, **kwargs: Any):
        kwargs.setdefault("temperature", 0.6)
        super().__init__(model, **kwargs)
        self.prompt = (instruction or "").strip() or joycaption_prompt(caption_type, length)
        self.kind = "tags" if caption_type in TAG_TYPES and not (instruction or "").strip() else "sentence"

    def _load_parts(self, ref: str, model_kwargs: dict[str, Any]):
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        processor = AutoProcessor.from_pretrained(ref)
        processor.tokenizer.padding_side = "left"
        model = LlavaForConditionalGeneration.from_pretrained(ref, **model_kwargs)
        return model, processor

    def prepare(self, image: Image.Image) -> Image.Image:
        size = self._processor.image_processor.size
        return resize_to(image, size["width"], size["height"])

    def _chat(self) -> str:
        processor = self._processor
        image_token = processor.image_token
        convo = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": self.prompt}]
        text = processor.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
        if image_token not in text:  # a template that leaves the image to the caller
            convo[1]["content"] = f"{image_token}\n{self.prompt}"
            text = processor.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
        return text

    def model_inputs(self, images: list[Image.Image]) -> dict[str, Any]:
        """The processor's tensors for ``images`` (already ``prepare``d), on the model's device."""
        processor = self._processor
        text = self._chat()
        bos = processor.tokenizer.bos_token
        inputs = processor(text=[text] * len(images), images=images, return_tensors="pt", padding=True,
                           do_resize=False, add_special_tokens=not (bos and text.startswith(bos)))
        return self._to_model(inputs)

    def _caption_batch(self, images: list[Image.Image]) -> list[str]:
        inputs = self.model_inputs(images)
        output = self._generate(inputs)
        return self._decode_new(self._processor.tokenizer, output, inputs["input_ids"].shape[1])
