"""Will a caption fit the target model's text encoder? Count its tokens and flag the ones that get cut.

Each family reads a caption through one text encoder that stops after a fixed number of tokens (its registry
entry's ``text_limit`` in ``families.py``); what follows is silently dropped in training:

    sd15, sd2, sdxl        CLIP   77 tokens (start and end markers included)
    flux, chroma           T5    512
    sd3                    T5    256 (the pipeline's default; its CLIP encoders stop at 77)
    qwen_image             Qwen2.5-VL 512
    z_image, flux2         Qwen3 (FLUX.2 dev: Mistral) 512

``TokenCounter`` counts with the base model's own tokenizer when the base model is a local diffusers folder
(exact), and otherwise estimates from the words and punctuation (marked "about"). Checked against CLIP's real
BPE vocabulary on ten typical captions (tags, short sentences, paragraphs of 13-59 tokens): 3 tokens long in
total, each caption within -1 and +3. The T5 and Qwen estimates follow the same rule with their tokenizers'
usual word lengths and have not been checked against the real vocabularies (none is on this machine).
``check_lengths`` gives a ``LengthCheck`` per caption; ``flag_long_captions`` adds "caption too long" to the
matching files of a dataset scan, which ``dataset check`` and the Captioning tab show.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Hashable, Mapping, TypeVar

from lora_studio.families import FAMILIES, TextLimit

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)


# the families whose text encoder stops after a fixed number of tokens (the registry says which and where)
FAMILY_LIMITS: dict[str, TextLimit] = {f.id: f.text_limit for f in FAMILIES.values() if f.text_limit}
FAMILY_LABELS = {f.id: f.label for f in FAMILIES.values()}

_WORDS = re.compile(r"'(?:s|t|re|ve|m|ll|d)\b|[^\W\d_]+|\d|[^\w\s]", re.IGNORECASE)
# (letters one token covers, extra letters per further token, tokens the encoder adds)
_ESTIMATE = {"clip": (8, 5, 2), "t5": (7, 4, 1), "qwen": (9, 5, 0)}


def estimate_tokens(text: str, kind: str) -> int:
    """About how many tokens ``kind``'s tokenizer makes of ``text`` (words, digits and marks; long words more)."""
    covered, per_token, added = _ESTIMATE[kind]
    count = added
    for piece in _WORDS.findall(text):
        count += 1 + (max(0, len(piece) - covered) + per_token - 1) // per_token if piece[0].isalpha() else 1
    return count


@functools.lru_cache(maxsize=8)
def _local_tokenizer(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


@dataclass(frozen=True)
class LengthCheck:
    tokens: int
    limit: int
    exact: bool
    encoder: str
    family: str

    @property
    def cut(self) -> bool:
        return self.tokens > self.limit

    def label(self) -> str:
        """For the caption table: "83/77 cut", "about 40/77"."""
        text = f"{'' if self.exact else 'about '}{self.tokens}/{self.limit}"
        return text + (" cut" if self.cut else "")

    def problem(self) -> str:
        return (f"caption too long: {'' if self.exact else 'about '}{self.tokens} {self.encoder} tokens, "
                f"{FAMILY_LABELS.get(self.family, self.family)} reads {self.limit}")


class TokenCounter:
    """Counts caption tokens for ``family`` (exactly with a local ``base_model``'s tokenizer)."""

    def __init__(self, family: str, base_model: str | None = None):
        if family not in FAMILY_LIMITS:
            raise ValueError(f"No text encoder limit is known for the family '{family}'; known: "
                             f"{', '.join(FAMILY_LIMITS)}.")
        self.family = family
        self.limit = FAMILY_LIMITS[family]
        self.tokenizer = None
        folder = Path(base_model).expanduser() / self.limit.subfolder if base_model else None
        if folder is not None and folder.is_dir():
            try:
                self.tokenizer = _local_tokenizer(str(folder))
            except Exception as exc:  # noqa: BLE001 - an unreadable tokenizer falls back to the estimate
                log.debug("no tokenizer in %s: %s", folder, exc)

    def count(self, text: str) -> int:
        if self.tokenizer is None:
            return estimate_tokens(text, self.limit.kind)
        special = self.limit.kind != "qwen"  # Qwen's prompt template is not part of the caption's budget
        return len(self.tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"])

    def check(self, text: str) -> LengthCheck:
        return LengthCheck(self.count(text), self.limit.tokens, self.tokenizer is not None, self.limit.encoder,
                           self.family)


def check_lengths(captions: Mapping[K, str], family: str, base_model: str | None = None) -> dict[K, LengthCheck]:
    """A ``LengthCheck`` per non-empty caption ({} for a family without a known limit, e.g. a language model)."""
    if family not in FAMILY_LIMITS:
        return {}
    counter = TokenCounter(family, base_model)
    return {key: counter.check(text) for key, text in captions.items() if text and text.strip()}


def flag_long_captions(report, family: str, base_model: str | None = None) -> list[Path]:
    """Add "caption too long" to each usable file of a ``ScanReport`` whose caption is too long; their paths."""
    checks = check_lengths(report.captions, family, base_model)
    flagged = []
    for item in report.usable:
        check = checks.get(item.path)
        if check is not None and check.cut:
            item.problems.append(check.problem())
            flagged.append(item.path)
    return flagged


def limit_text(family: str) -> str:
    """E.g. "SDXL reads 77 CLIP tokens" ("" for an unknown family)."""
    limit = FAMILY_LIMITS.get(family)
    return f"{FAMILY_LABELS.get(family, family)} reads {limit.tokens} {limit.encoder} tokens" if limit else ""


