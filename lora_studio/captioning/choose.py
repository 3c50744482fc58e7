"""Pick and build a captioner by name (``florence2``, ``qwen-vl``, ``joycaption``, ``wd14``, ``blip``) or from a
hub id or a local model folder, with one options object shared by the command line and the app.

    captioner = make_captioner("florence2", CaptionerOptions(style="detailed"))
    captioner = make_captioner("/models/wd-eva02-large-tagger-v3", CaptionerOptions(general_threshold=0.5))

A folder is recognised by its files (``model.onnx`` + ``selected_tags.csv`` is a WD14 tagger; otherwise
``config.json``'s ``model_type``), a hub id by its name. The caption style fills in whatever the options
leave open: Florence-2's task, Qwen-VL's instruction, JoyCaption's caption type and length, the number of
tokens to generate (``style.STYLE_DEFAULTS``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lora_studio.captioning.base import Captioner
from lora_studio.captioning.style import STYLE_DEFAULTS, check_style
from lora_studio.models.loading import is_local

CAPTIONERS = {"florence2": "Florence-2", "qwen-vl": "Qwen-VL", "joycaption": "JoyCaption", "wd14": "WD14 tagger",
              "blip": "BLIP"}
MODEL_TYPES = {"florence2": "florence2", "qwen2_5_vl": "qwen-vl", "qwen3_vl": "qwen-vl", "qwen2_vl": "qwen-vl",
               "llava": "joycaption", "blip": "blip"}
NAME_HINTS = (("florence", "florence2"), ("joycaption", "joycaption"), ("llava", "joycaption"),
              ("qwen", "qwen-vl"), ("tagger", "wd14"), ("wd-", "wd14"), ("blip", "blip"))


@dataclass
class CaptionerOptions:
    """Every captioner's settings; each captioner reads the ones it has (None: from the style)."""

    style: str = "short"
    max_new_tokens: int | None = None
    temperature: float | None = None        # Qwen-VL, JoyCaption: 0 = the same caption every run
    batch_size: int = 4
    device: str | None = None
    task: str | None = None                 # Florence-2: caption, detailed, more_detailed
    instruction: str | None = None          # Qwen-VL (and JoyCaption instead of a caption type)
    quantize_4bit: bool = False             # Qwen-VL on CUDA
    max_pixels: int | None = None           # Qwen-VL
    caption_type: str | None = None         # JoyCaption
    length: str | None = None               # JoyCaption: a length word or a number of words
    general_threshold: float = 0.35         # WD14
    character_threshold: float = 0.85
    exclude: list[str] = field(default_factory=list)
    underscores_to_spaces: bool = True
    include_rating: bool = False
    prefix: str | None = None               # BLIP


def default_model(name: str) -> str:
    """The hub id each captioner uses when no model is given."""
    from lora_studio.captioning.blip import DEFAULT_BLIP
    from lora_studio.captioning.florence import DEFAULT_FLORENCE
    from lora_studio.captioning.joycaption import DEFAULT_JOYCAPTION
    from lora_studio.captioning.qwen_vl import DEFAULT_QWEN_VL
    from lora_studio.captioning.wd14 import DEFAULT_WD14

    return {"florence2": DEFAULT_FLORENCE, "qwen-vl": DEFAULT_QWEN_VL, "joycaption": DEFAULT_JOYCAPTION,
            "wd14": DEFAULT_WD14, "blip": DEFAULT_BLIP}[name]


def _read_model_type(folder: Path) -> str:
    try:
        return str(json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type", ""))
    except (OSError, ValueError):
        return ""


def detect_captioner(model: str) -> str:
    """Which captioner runs ``model`` (a captioner name, a local folder or a hub id); ValueError if unclear."""
    ref = str(model).strip()
    if ref.lower() in CAPTIONERS:
        return ref.lower()
    folder = Path(ref).expanduser()
    if folder.is_dir():
        if (folder / "model.onnx").is_file() and (folder / "selected_tags.csv").is_file():
            return "wd14"
        model_type = _read_model_type(folder)
        if model_type in MODEL_TYPES:
            return MODEL_TYPES[model_type]
        raise ValueError(f"'{ref}' is not a captioning model LoRA Studio knows (model type "
                         f"'{model_type or 'none'}'): it takes Florence-2, Qwen2.5-VL/Qwen3-VL, JoyCaption (llava), "
                         "BLIP folders, and WD14 taggers (model.onnx + selected_tags.csv).")
    if is_local(ref):
        raise ValueError(f"The captioning model folder '{ref}' does not exist; give an existing folder, a hub id, "
                         f"or one of {', '.join(CAPTIONERS)}.")
    lowered = ref.lower()
    for hint, name in NAME_HINTS:
        if hint in lowered:
            return name
    raise ValueError(f"Cannot tell which captioner '{ref}' is: give one of {', '.join(CAPTIONERS)}, a model "
                     "folder, or a hub id whose name says which (florence, qwen...vl, joycaption, tagger, blip).")


def make_captioner(model: str, options: CaptionerOptions | None = None, kind: str | None = None) -> Captioner:
    """The captioner for ``model`` (a name uses its default hub model) set up with ``options``; ``kind`` (a
    captioner name) says which captioner runs it instead of telling from the model."""
    options = options or CaptionerOptions()
    name = kind or detect_captioner(model)
    if name not in CAPTIONERS:
        raise ValueError(f"Unknown captioner '{name}'; known: {', '.join(CAPTIONERS)}.")
    ref = default_model(name) if str(model).strip().lower() in CAPTIONERS else str(model).strip()
    defaults = STYLE_DEFAULTS[check_style(options.style)]
    common = dict(device=options.device, batch_size=options.batch_size)
    tokens = options.max_new_tokens or defaults.max_new_tokens
    sampling = {} if options.temperature is None else {"temperature": options.temperature}
    if name == "florence2":
        from lora_studio.captioning.florence import FlorenceCaptioner

        return FlorenceCaptioner(ref, task=options.task or defaults.florence_task, max_new_tokens=tokens, **common)
    if name == "qwen-vl":
        from lora_studio.captioning.qwen_vl import DEFAULT_MAX_PIXELS, QwenVLCaptioner

        return QwenVLCaptioner(ref, instruction=options.instruction or defaults.instruction, max_new_tokens=tokens,
                               quantize_4bit=options.quantize_4bit, max_pixels=options.max_pixels or DEFAULT_MAX_PIXELS,
                               **sampling, **common)
    if name == "joycaption":
        from lora_studio.captioning.joycaption import JoyCaptioner

        return JoyCaptioner(ref, caption_type=options.caption_type or defaults.joy_type,
                            length=options.length or defaults.joy_length, instruction=options.instruction,
                            max_new_tokens=tokens, **sampling, **common)
    if name == "wd14":
        from lora_studio.captioning.wd14 import WD14Tagger

        return WD14Tagger(ref, general_threshold=options.general_threshold,
                          character_threshold=options.character_threshold, exclude=options.exclude,
                          underscores_to_spaces=options.underscores_to_spaces, include_rating=options.include_rating,
                          **common)
    from lora_studio.captioning.blip import BlipCaptioner

    return BlipCaptioner(ref, prefix=options.prefix, max_new_tokens=options.max_new_tokens or 40, **common)
