"""What the Captioning tab's choices mean to the engine (no gradio here, so it is testable directly).

    CHOICES                      # the captioners a creator can tick, sentence captioners before taggers
    build_captioners(["Florence-2", "WD14 tags"], refs, options)   # in that order: sentence, then tags
    caption_table(root, captions, files, family, base_model)       # table rows with a token count column
    family_style(family, base_model)                               # the style the family's models want

The table has a fourth column with each caption's token count against the family's text encoder
("about 83/77 cut"), so captions that will be cut stand out before training.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Mapping

from ..captioning.base import Captioner
from ..captioning.choose import CaptionerOptions, default_model, make_captioner
from ..captioning.style import default_style, merge_parts
from ..captioning.token_limits import FAMILY_LIMITS, check_lengths, limit_text

# label -> (captioner name for choose.make_captioner, whose model textbox)
CHOICES = {"BLIP caption": "blip", "Florence-2": "florence2", "Qwen-VL": "qwen-vl", "JoyCaption": "joycaption",
           "WD14 tags": "wd14", "CLIP style tags": "clip"}
ONE_CAPTIONER = [c for c in CHOICES if c != "CLIP style tags"]
HEADERS = ["image", "file", "caption", "tokens"]
FAMILY_CHOICES = [(f"{name} ({limit_text(name)})", name) for name in FAMILY_LIMITS]


def build_captioners(labels: list[str], refs: Mapping[str, str], options: CaptionerOptions,
                     check_ref: Callable[[str, str], str] = lambda ref, what: ref) -> list[Captioner]:
    """Captioners for the ticked ``labels`` (sentence captioners first, taggers after); ``refs`` maps a
    captioner name to its model; ``check_ref`` is the app's path policy for typed model paths."""
    from ..captioning.clip_tags import DEFAULT_CLIP, ClipStyleTagger

    unknown = [label for label in labels if label not in CHOICES]
    if unknown:
        raise ValueError(f"Unknown captioner {unknown[0]!r}; pick from {', '.join(CHOICES)}.")
    if not labels:
        raise ValueError("Pick at least one captioner (a sentence captioner such as Florence-2 and/or a tagger).")
    out: list[Captioner] = []
    for label in CHOICES:  # the table's order: sentences, then tags
        if label not in labels:
            continue
        name = CHOICES[label]
        ref = (refs.get(name) or "").strip() or (DEFAULT_CLIP if name == "clip" else default_model(name))
        ref = check_ref(ref, f"{label} model")
        if name == "clip":
            out.append(ClipStyleTagger(ref, device=options.device, batch_size=options.batch_size))
        else:
            out.append(make_captioner(ref, options, kind=name))
    out.sort(key=lambda c: c.kind == "tags")
    return out


def family_style(family: str | None, base_model: str = "") -> str:
    return default_style(family, base_model)


def family_from_training(base_model: str | None, model_family: str | None) -> tuple[str | None, str]:
    """The Training tab's (family, base model) for captioning; family None for one without a caption style
    (a language model)."""
    from .train_family import family_of

    model = (base_model or "").strip()
    family = family_of(model, model_family or "auto")
    return (family if family in FAMILY_LIMITS else None), model


def caption_table(root: Path, captions: Mapping[str, str], files: list[str], family: str | None,
                  base_model: str | None, thumbnail: Callable[[Path, str], str]) -> tuple[list[list[str]], int]:
    """Rows ``[thumbnail, file, caption, tokens]`` and how many captions the family's encoder cuts."""
    checks = check_lengths({f: captions.get(f, "") for f in files}, family or "", base_model or None)
    rows = [[thumbnail(root, f), f, captions.get(f, ""), checks[f].label() if f in checks else ""] for f in files]
    return rows, sum(1 for c in checks.values() if c.cut)


def cut_note(count: int, family: str | None) -> str:
    if not count or not family:
        return ""
    return (f"\n\n**{count} caption(s) are longer than {limit_text(family)}**: the end of each is cut in "
            "training (see the tokens column).")


@dataclass
class CaptionSetup:
    """The tab's captioner settings, in the order of its inputs (``SETUP_FIELDS``)."""

    blip_model: str = ""
    clip_model: str = ""
    florence_model: str = ""
    qwen_model: str = ""
    joy_model: str = ""
    wd14_model: str = ""
    family: str | None = None
    style: str = "short"
    trigger_placement: str = "start"
    base_model: str = ""
    task: str = ""
    instruction: str = ""
    four_bit: bool = False
    joy_type: str = ""
    joy_length: str = ""
    temperature: float | None = None
    general_threshold: float = 0.35
    character_threshold: float = 0.85
    exclude: str = ""
    underscores_to_spaces: bool = True
    rating: bool = False
    max_tokens: float | None = None

    @classmethod
    def from_names(cls, values: Mapping[str, object]) -> "CaptionSetup":
        """From a mapping that has every field's name (e.g. an event function's ``locals()``); None = default."""
        return cls(**{f.name: values[f.name] for f in fields(cls) if values[f.name] is not None})

    def refs(self) -> dict[str, str]:
        return {"blip": self.blip_model, "clip": self.clip_model, "florence2": self.florence_model,
                "qwen-vl": self.qwen_model, "joycaption": self.joy_model, "wd14": self.wd14_model}

    def options(self) -> CaptionerOptions:
        return CaptionerOptions(
            style=self.style or "short", max_new_tokens=int(self.max_tokens) if self.max_tokens else None,
            temperature=None if self.temperature is None or self.temperature < 0 else float(self.temperature),
            task=self.task or None, instruction=(self.instruction or "").strip() or None,
            quantize_4bit=bool(self.four_bit), caption_type=self.joy_type or None, length=self.joy_length or None,
            general_threshold=float(self.general_threshold), character_threshold=float(self.character_threshold),
            exclude=[t.strip() for t in (self.exclude or "").split(",") if t.strip()],
            underscores_to_spaces=bool(self.underscores_to_spaces), include_rating=bool(self.rating))


SETUP_FIELDS = [f.name for f in fields(CaptionSetup)]


def merge_pair(text_a: str, text_b: str, label_a: str, label_b: str) -> str:
    """Two captions of one image as one: the sentence first, a tagger's tags after it."""
    first, second = (text_b, text_a) if CHOICES.get(label_a) == "wd14" and CHOICES.get(label_b) != "wd14" \
        else (text_a, text_b)
    return merge_parts([first, second])
