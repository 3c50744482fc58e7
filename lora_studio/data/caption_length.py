"""Captions longer than the text encoder reads.

Stable Diffusion's CLIP text encoders read 77 tokens (the start and end tokens included); the rest of a
longer caption is cut off and never learned, silently. The trainer counts with the model's own tokenizer
(``count_too_long``) and says so in the log; ``dataset check`` and the Captioning tab estimate per target
family (``captioning/token_limits.py``).
"""

from __future__ import annotations

from typing import Callable, Iterable


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
