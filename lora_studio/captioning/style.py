"""Caption styles per target model family, how a style shapes captions, and where the trigger word goes.

A model learns best from captions written the way its own training captions were:

    tags       "1girl, long hair, red dress, smile, outdoors"          (SD1.5/SDXL anime models: Pony, Illustrious)
    short      "a woman in a red dress smiling in a garden"             (SD1.5, SD2, SDXL)
    detailed   "A young woman with long black hair stands in a ..."     (FLUX, Chroma, SD3.5, Qwen-Image, Z-Image)

``default_style(family, base_model)`` picks one from the Training tab's family (an anime-looking model name
means tags). ``STYLE_DEFAULTS`` says what each captioner does for a style (Florence-2's task, Qwen-VL's
instruction, JoyCaption's type and length, how many tokens to generate). ``shape_caption`` tidies one
captioner's output for the style: a short style keeps the first sentence, a detailed one becomes one
paragraph on one line, tags are de-duplicated. ``merge_parts`` joins a sentence and tags ("a woman in a
garden, 1girl, smile"); ``place_trigger`` puts the trigger word at the start or the end, or where the
caption writes ``[trigger]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from lora_studio.captioning.edits import add_trigger, dedupe_tags
from lora_studio.data.tags import join_tags, split_tags
from lora_studio.families import FAMILIES

STYLES = {"tags": "tags", "short": "short sentence", "detailed": "detailed paragraph"}
TRIGGER_PLACEMENTS = ("start", "end", "none")
TRIGGER_PLACEHOLDER = "[trigger]"

# what each image family's text encoder was trained on (its registry entry's caption_style)
FAMILY_STYLE = {f.id: f.caption_style for f in FAMILIES.values() if f.is_image}
ANIME_HINTS = ("pony", "illustrious", "noob", "animagine", "anime", "anything-v", "waifu", "kohaku", "hassaku")


@dataclass(frozen=True)
class StyleDefaults:
    """What each captioner does for one style."""

    florence_task: str
    instruction: str          # Qwen-VL
    joy_type: str
    joy_length: str
    max_new_tokens: int


STYLE_DEFAULTS = {
    "tags": StyleDefaults(
        "caption", "List what this image shows as comma-separated booru-style tags: subject, hair, clothing, pose, "
        "expression, setting, lighting and art style. Write only the tags.", "booru_like_tags", "medium-length", 96),
    "short": StyleDefaults(
        "caption", "Describe this image in one sentence of at most 25 words, starting with the main subject. "
        "Do not start with 'The image shows'.", "descriptive", "short", 64),
    "detailed": StyleDefaults(
        "more_detailed", "Describe this image in one detailed paragraph: the main subject and what it looks like, "
        "clothing, pose and expression, the setting and background, lighting, colours, camera angle and the "
        "medium or art style. Describe only what is visible, in plain sentences, without lists, headings or "
        "phrases like 'The image shows'.", "descriptive", "long", 320),
}


def check_style(style: str) -> str:
    """``style`` if it is one of ``STYLES``; ValueError with the choices otherwise."""
    if style not in STYLES:
        raise ValueError(f"Caption style '{style}' is not one of {', '.join(STYLES)}.")
    return style


def default_style(family: str | None, base_model: str = "") -> str:
    """The caption style that suits ``family`` (tags for an anime-looking SD1.5/SDXL model name)."""
    style = FAMILY_STYLE.get((family or "").lower(), "short")
    if style == "short" and any(hint in str(base_model).lower() for hint in ANIME_HINTS):
        return "tags"
    return style


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_FILLER_START = re.compile(r"^(the|this) (image|picture|photo(graph)?) (shows|depicts|features|is of)\s+", re.I)


def shape_caption(text: str, style: str | None, kind: str = "sentence") -> str:
    """One captioner's output tidied for ``style`` (``kind``: "sentence" or "tags")."""
    text = " ".join(str(text).split())
    if not text or style is None:
        return text
    if kind == "tags":
        return dedupe_tags(join_tags(split_tags(text)))
    text = _FILLER_START.sub("", text)
    text = text[:1].upper() + text[1:] if style == "detailed" else text
    if style == "short":
        text = _SENTENCE_END.split(text, maxsplit=1)[0].rstrip(" .")
    return text


def merge_parts(parts: Iterable[str]) -> str:
    """Join captioner outputs (a sentence, then tags): "a woman in a garden, 1girl, smile"."""
    parts = [p.strip() for p in parts if p and p.strip()]
    if len(parts) > 1:
        parts = [p.rstrip(" .,") for p in parts[:-1]] + parts[-1:]
    return ", ".join(parts)


def place_trigger(caption: str, trigger: str | None, placement: str = "start") -> str:
    """``caption`` with ``trigger`` at the start (once), at the end, or in place of ``[trigger]``."""
    trigger = (trigger or "").strip()
    if placement not in TRIGGER_PLACEMENTS:
        raise ValueError(f"Trigger placement '{placement}' is not one of {', '.join(TRIGGER_PLACEMENTS)}.")
    if TRIGGER_PLACEHOLDER in caption:
        return caption.replace(TRIGGER_PLACEHOLDER, trigger).strip(" ,") if trigger else caption
    if not trigger or placement == "none":
        return caption
    if placement == "start":
        return add_trigger(caption, trigger)
    tags = split_tags(caption)
    if tags and tags[-1].lower() == trigger.lower():
        return caption
    return join_tags([*(t for t in tags if t.lower() != trigger.lower()), trigger])


def target_family(family: str | None, base_model: str | None = None) -> str | None:
    """``family`` when given (not "auto"), else the family detected from ``base_model``, else None."""
    if family and family != "auto":
        return family
    if not base_model:
        return None
    from lora_studio.errors import StudioError
    from lora_studio.models.loading import detect_family

    try:
        return detect_family(base_model)
    except StudioError:
        return None


def resolve_style(style: str | None, family: str | None, base_model: str = "", tags_only: bool = False) -> str:
    """The style to caption in: ``style`` when given, else the family's, else tags for a tagger, else short."""
    if style:
        return check_style(style)
    if family:
        return default_style(family, base_model)
    return "tags" if tags_only else "short"
