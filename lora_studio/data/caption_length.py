"""Captions longer than the text encoder reads.

Stable Diffusion's CLIP text encoders read 77 tokens (the start and end tokens included); the rest of a
longer caption is cut off and never learned, silently. The trainer counts with the model's own tokenizer
(``count_too_long``); ``dataset check`` has no model at hand and estimates with CLIP's word splitting
(``approx_clip_tokens``: each word, number and run of punctuation is at least one token, so the estimate
is on the low side and only flags captions that are surely too long).
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

CLIP_TOKEN_LIMIT = 77
# CLIP's pre-tokenizer: contractions, runs of letters, single digits, runs of other symbols.
_PIECES = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+")


def approx_clip_tokens(text: str) -> int:
    """A lower estimate of the CLIP tokens of ``text`` (start and end tokens included)."""
    return len(_PIECES.findall(text.lower())) + 2


def count_too_long(captions: Iterable[str], count_tokens: Callable[[list[str]], list[int]],
                   limit: int) -> tuple[int, int, int]:
    """``(captions over limit, all captions, longest in tokens)``; ``count_tokens`` maps captions to lengths."""
    items = [c for c in captions if c]
    lengths = count_tokens(items) if items else []
    return sum(1 for n in lengths if n > limit), len(items), max(lengths, default=0)


def too_long_message(cut: int, total: int, limit: int, longest: int, approximate: bool = False) -> str:
    """The warning for the training log and ``dataset check``."""
    about = "about " if approximate else ""
    text = (f"{cut} of {total} captions are longer than the text encoder's limit of {limit} tokens (the longest "
            f"has {about}{longest}); they are cut at {limit} tokens and the words after that are not learned. "
            "Shorten them, or put the important words first.")
    if approximate:
        text += " (Counted approximately, without the model's tokenizer; the training log gives the exact count.)"
    return text
