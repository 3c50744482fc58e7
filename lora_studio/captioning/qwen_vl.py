"""Qwen2.5-VL and Qwen3-VL instruct models as captioners, with an instruction you can edit.

The model class follows the checkpoint's ``model_type`` (``qwen2_5_vl``, ``qwen3_vl``, also ``qwen2_vl``).
transformers' ``AutoProcessor`` for these models wants torchvision (for video), so the tokenizer and the
image processor (``Qwen2VLImageProcessorPil``) are loaded directly and the prompt is written here in the
models' chat format, with ``<|image_pad|>`` repeated once per image token (patches / merge_size²). Each
image is resized once to the size the processor would pick (a multiple of patch x merge, at most
``max_pixels``), so large photos do not become thousands of tokens. Prompts are padded on the left so a
batch generates together. ``quantize_4bit`` loads the language model in NF4 on a CUDA GPU (the vision
tower stays in bf16).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from PIL import Image

from lora_studio.captioning.generative import GenerativeCaptioner, resize_to
from lora_studio.errors import ModelLoadError

log = logging.getLogger(__name__)

DEFAULT_QWEN_VL = "Qwen/Qwen3-VL-4B-Instruct"
QWEN_VL_MODELS = ("Qwen/Qwen3-VL-4B-Instruct", "Qwen/Qwen3-VL-8B-Instruct", "Qwen/Qwen2.5-VL-3B-Instruct",
                  "Qwen/Qwen2.5-VL-7B-Instruct")
DEFAULT_MAX_PIXELS = 1024 * 1024
IMAGE_PAD = "<|image_pad|>"


def _model_class(model_type: str):
    import transformers

    classes = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration",
               "qwen2_vl": "Qwen2VLForConditionalGeneration"}
    if model_type not in classes:
        raise ModelLoadError(f"The model is a '{model_type}' model, not Qwen2-VL, Qwen2.5-VL or Qwen3-VL; pick the "
                             "captioner that matches it.")
    return getattr(transformers, classes[model_type])


def chat_prompt(instruction: str, image_tokens: int, system: str | None) -> str:
    """The Qwen chat (ChatML) prompt with one image of ``image_tokens`` tokens, then ``instruction``."""
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    image = f"<|vision_start|>{IMAGE_PAD * image_tokens}<|vision_end|>"
    return f"{head}<|im_start|>user\n{image}{instruction.strip()}<|im_end|>\n<|im_start|>assistant\n"


class QwenVLCaptioner(GenerativeCaptioner):
    """A Qwen-VL instruct model answering ``instruction`` about each image."""

    name = "Qwen-VL"
    what = "Qwen-VL model"
    skip_4bit = ["visual", "lm_head"]

    def __init__(self, model: str | os.PathLike = DEFAULT_QWEN_VL, instruction: str = "Describe this image.",
                 max_pixels: int = DEFAULT_MAX_PIXELS, **kwargs: Any):
        super().__init__(model, **kwargs)
        if not instruction or not instruction.strip():
            raise ValueError("The Qwen-VL instruction is empty; write what the model should do, e.g. "
                             "'Describe this image in one sentence.'")
        self.instruction = instruction
        self.max_pixels = int(max_pixels)

    def _load_parts(self, ref: str, model_kwargs: dict[str, Any]):
        from transformers import AutoConfig, AutoTokenizer, Qwen2VLImageProcessorPil

        config = AutoConfig.from_pretrained(ref)
        model_cls = _model_class(config.model_type)
        tokenizer = AutoTokenizer.from_pretrained(ref)
        tokenizer.padding_side = "left"
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(ref)
        model = model_cls.from_pretrained(ref, **model_kwargs)
        self._system = "You are a helpful assistant." if config.model_type != "qwen3_vl" else None
        return model, (tokenizer, image_processor)

    def prepare(self, image: Image.Image) -> Image.Image:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        image_processor = self._processor[1]
        factor = image_processor.patch_size * image_processor.merge_size
        size = image_processor.size
        height, width = smart_resize(image.height, image.width, factor=factor, min_pixels=size["shortest_edge"],
                                     max_pixels=min(size["longest_edge"], self.max_pixels))
        return resize_to(image, width, height)

    def model_inputs(self, images: list[Image.Image]) -> dict[str, Any]:
        """Prompts (one image-token run per image) and pixels for ``images`` (already ``prepare``d)."""
        tokenizer, image_processor = self._processor
        pixels = image_processor(images=images, return_tensors="pt", do_resize=False)
        merge = image_processor.merge_size ** 2
        prompts = [chat_prompt(self.instruction, int(grid.prod()) // merge, self._system)
                   for grid in pixels["image_grid_thw"]]
        text = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        return self._to_model({**text, **pixels})

    def _caption_batch(self, images: list[Image.Image]) -> list[str]:
        inputs = self.model_inputs(images)
        output = self._generate(inputs)
        return self._decode_new(self._processor[0], output, inputs["input_ids"].shape[1])
