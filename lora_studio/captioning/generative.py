"""What the transformers vision-language captioners share (Florence-2, Qwen-VL, JoyCaption).

``GenerativeCaptioner`` loads the model once per batch (a hub id or a local folder, never with
``trust_remote_code``), in bf16 on a CUDA GPU (fp32 on the CPU), optionally in 4-bit on CUDA with
bitsandbytes; moves the processor's tensors to the model; generates (greedy or beam search, or sampling
when ``temperature`` > 0); and drops the model afterwards. ``resize_to`` resizes an image once, to exactly
what the image processor would have produced, so the processor is called with ``do_resize=False``.
"""

from __future__ import annotations

import logging
import os
from abc import abstractmethod
from typing import Any, Callable

from PIL import Image

from lora_studio.captioning.base import Captioner, free_memory, pick_device, pick_dtype
from lora_studio.captioning.loading import load_model_part

log = logging.getLogger(__name__)


def resize_to(image: Image.Image, width: int, height: int) -> Image.Image:
    """``image`` resized to ``width`` x ``height`` with a bicubic filter (a no-op when it already is)."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.BICUBIC, reducing_gap=3.0)


def quantization_config(dtype, skip_modules: list[str]):
    """A bitsandbytes NF4 config computing in ``dtype`` (``skip_modules`` stay in ``dtype``)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_use_double_quant=True, llm_int8_skip_modules=skip_modules)


class GenerativeCaptioner(Captioner):
    """Base of the captioners that generate text with a transformers model and a processor."""

    what = "captioning model"        # named in error sentences
    skip_4bit: list[str] = ["lm_head"]  # modules kept out of 4-bit quantization

    def __init__(self, model: str | os.PathLike, max_new_tokens: int = 256, device: str | None = None,
                 batch_size: int = 4, quantize_4bit: bool = False, temperature: float = 0.0, top_p: float = 0.9,
                 num_beams: int = 1, repetition_penalty: float = 1.0):
        super().__init__(batch_size=batch_size, device=device)
        self.model_ref = str(model)
        self.max_new_tokens = int(max_new_tokens)
        self.quantize_4bit = bool(quantize_4bit)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.num_beams = max(1, int(num_beams))
        self.repetition_penalty = float(repetition_penalty)
        self._model = None
        self._processor = None

    @abstractmethod
    def _load_parts(self, ref: str, model_kwargs: dict[str, Any]) -> tuple[Any, Any]:
        """``(model, processor)`` loaded from ``ref`` with ``from_pretrained(ref, **model_kwargs)``."""

    def _model_kwargs(self, device: str, dtype) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"dtype": dtype}
        if self.quantize_4bit:
            if device.startswith("cuda"):
                kwargs.update(quantization_config=quantization_config(dtype, self.skip_4bit),
                              device_map={"": device})
            else:
                log.warning("%s: 4-bit loading needs a CUDA GPU; loading in full precision on %s", self.name, device)
        return kwargs

    def load(self, report: Callable[[str], None] | None = None) -> None:
        if self.loaded:
            return
        device = pick_device(self.device)
        dtype = pick_dtype(device)
        kwargs = self._model_kwargs(device, dtype)
        model, processor = load_model_part(lambda ref: self._load_parts(ref, kwargs), self.model_ref, self.what,
                                           report)
        if "device_map" not in kwargs:
            model = model.to(device)
        self._model, self._processor = model.eval(), processor
        self._device, self._dtype = device, dtype
        log.info("Loaded %s from %s on %s (%s%s)", self.name, self.model_ref, device, str(dtype).split(".")[-1],
                 ", 4-bit" if "quantization_config" in kwargs else "")

    def release(self) -> None:
        self._model = None
        self._processor = None
        free_memory()

    def _to_model(self, inputs) -> dict[str, Any]:
        """The processor's output on the model's device; floating tensors (pixels) in the model's dtype."""
        return {k: (v.to(self._device, self._dtype) if v.is_floating_point() else v.to(self._device))
                for k, v in inputs.items() if hasattr(v, "to")}

    def _generate(self, inputs: dict[str, Any]):
        import torch

        options: dict[str, Any] = {"max_new_tokens": self.max_new_tokens}
        if self.temperature > 0:
            options.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            options.update(do_sample=False, num_beams=self.num_beams)
        if self.repetition_penalty != 1.0:
            options["repetition_penalty"] = self.repetition_penalty
        with torch.inference_mode():
            return self._model.generate(**inputs, **options)

    def _decode_new(self, tokenizer, output, prompt_length: int) -> list[str]:
        """The generated text after the prompt, special tokens dropped, one string per image."""
        texts = tokenizer.batch_decode(output[:, prompt_length:], skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]
