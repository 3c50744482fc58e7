"""Tokenizers for the miniatures, built offline: the world's words are single tokens.

``write_world_clip_tokenizer`` writes a CLIP byte-level BPE tokenizer whose merges are learned (plain BPE)
from the world's words, so "red", "circle" or "background" is one token each and any other text (a made-up
trigger word) still tokenizes, byte by byte. ``world_qwen3_tokenizer`` does the same for a Qwen3-shaped
tokenizer (byte-level BPE, each word one token with and without its leading space).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..models.tiny import write_clip_tokenizer


def word_merges(words: list[str]) -> list[str]:
    """BPE merges, in rank order, after which each word is one CLIP token (``red</w>``)."""
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in sorted(set(words)) if w]
    merges: list[str] = []
    while True:
        counts = Counter((a, b) for seq in seqs for a, b in zip(seq, seq[1:]))
        if not counts:
            return merges
        pair = max(sorted(counts), key=lambda p: counts[p])  # most frequent; ties: the first in sorted order
        merges.append(f"{pair[0]} {pair[1]}")
        for i, seq in enumerate(seqs):
            out, j = [], 0
            while j < len(seq):
                if j + 1 < len(seq) and (seq[j], seq[j + 1]) == pair:
                    out.append(seq[j] + seq[j + 1])
                    j += 2
                else:
                    out.append(seq[j])
                    j += 1
            seqs[i] = out


def write_world_clip_tokenizer(folder: Path, words: list[str], max_length: int):
    """A ``CLIPTokenizer`` in ``folder`` with every word in ``words`` as a single token; returns it loaded."""
    from transformers import CLIPTokenizer

    write_clip_tokenizer(folder, max_length=max_length, merges=word_merges(words))
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    split = [w for w in words if len(tokenizer(w, add_special_tokens=False).input_ids) != 1]
    if split:
        raise RuntimeError(f"the miniature tokenizer splits {split}: its merges are wrong")
    return tokenizer


def world_qwen3_tokenizer(words: list[str], captions: list[str], make=None):
    """A Qwen3-shaped tokenizer (Z-Image's, FLUX.2 klein's; or what ``make(corpus)`` builds: Qwen-Image's) whose
    merges come from ``captions`` and ``words``; each word is one token at the start of a caption and after a space.
    Returns it with ``word_tokens``: the token ids of each word (for ``spread_word_embeddings``)."""
    if make is None:
        from ..models.tiny_z_image import _tokenizer as make

    tokenizer = make(captions + words + [" ".join(words), "user assistant"])
    word_tokens = [tokenizer([w, " " + w], add_special_tokens=False).input_ids for w in words]
    word_tokens = [first + spaced for first, spaced in word_tokens]
    split = [w for w, ids in zip(words, word_tokens) if len(ids) != 2]
    if split:
        raise RuntimeError(f"the miniature Qwen3 tokenizer splits {split}: its merges are wrong")
    return tokenizer, word_tokens
