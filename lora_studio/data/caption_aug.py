"""Caption changes at every training step: caption dropout, tag shuffling and tag dropout.

    augment_caption("mystyle, red dress, garden, smile", rng, shuffle=True, keep_tokens=1)
    -> "mystyle, smile, red dress, garden"        (the first keep_tokens tags stay first)

- ``caption_dropout_rate``: with this probability the caption is empty for that step, so the LoRA also learns
  the images without its words (it then works without the trigger word too).
- ``shuffle_tags``: the comma-separated tags after the first ``keep_tokens`` come in a new order each step, so no
  tag is learned as "the third word".
- ``tag_dropout_rate``: each tag after the first ``keep_tokens`` is left out with this probability.

The random choices come from ``rng`` (a ``random.Random`` the trainer seeds per sample and step), so a run is
repeatable and resumes exactly. Tags are split and joined as everywhere else (``data.tags``).
"""

from __future__ import annotations

import random

from .tags import join_tags, split_tags


def changes_captions(dropout: float, shuffle: bool, tag_dropout: float) -> bool:
    return bool(dropout or shuffle or tag_dropout)


def changes_tags(shuffle: bool, tag_dropout: float) -> bool:
    """True when the text itself varies (not only dropped whole): then cached text conditioning cannot hold it."""
    return bool(shuffle or tag_dropout)


def augment_caption(caption: str, rng: random.Random, *, dropout: float = 0.0, shuffle: bool = False,
                    keep_tokens: int = 0, tag_dropout: float = 0.0) -> str:
    """The caption for one step (see the module doc)."""
    if dropout and rng.random() < dropout:
        return ""
    if not changes_tags(shuffle, tag_dropout):
        return caption
    tags = split_tags(caption)
    fixed, rest = tags[:keep_tokens], tags[keep_tokens:]
    if tag_dropout:
        rest = [t for t in rest if rng.random() >= tag_dropout]
    if shuffle:
        rng.shuffle(rest)
    return join_tags(fixed + rest)
