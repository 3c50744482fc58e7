"""Batch caption edits: trigger word, prefix/suffix, find/replace, remove tags, dedupe tags, lower-case.

One ``CaptionEdit`` describes the change; ``apply_edit`` applies it to one caption, ``apply_edits`` to a
dict of captions, and ``preview_edits`` returns ``(key, before, after)`` for the captions it would change,
so the UI can show the change before it is saved. Steps run in a fixed order: find/replace, remove tags,
lower-case, dedupe, prefix, suffix, trigger word (so the trigger keeps its own letter case).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Hashable, Mapping, TypeVar

from lora_studio.data.tags import join_tags, split_tags

K = TypeVar("K", bound=Hashable)


@dataclass
class CaptionEdit:
    """A batch edit. Empty fields do nothing."""

    trigger: str = ""
    prefix: str = ""
    suffix: str = ""
    find: str = ""
    replace: str = ""
    regex: bool = False
    remove_tags: list[str] = field(default_factory=list)
    dedupe: bool = False
    lowercase: bool = False

    def is_noop(self) -> bool:
        return not (self.trigger.strip() or self.prefix.strip() or self.suffix.strip() or self.find
                    or self.remove_tags or self.dedupe or self.lowercase)


def _has_leading(tags: list[str], word: str) -> bool:
    """True when the first tag is ``word`` or starts with ``word`` followed by a space."""
    if not tags:
        return False
    first, w = tags[0].lower(), word.lower()
    return first == w or first.startswith(w + " ")


def add_trigger(caption: str, trigger: str) -> str:
    """Put ``trigger`` first, exactly once: other tags equal to it are removed, a leading one is kept."""
    trigger = trigger.strip()
    if not trigger:
        return caption
    tags = split_tags(caption)
    if _has_leading(tags, trigger):
        head, rest = tags[0], tags[1:]
    else:
        head, rest = trigger, tags
    rest = [t for t in rest if t.lower() != trigger.lower()]
    if [head, *rest] == tags:
        return caption  # already right: keep the text exactly as it was
    return join_tags([head, *rest])


def remove_tags(caption: str, unwanted: list[str]) -> str:
    """Drop tags equal (ignoring case) to any of ``unwanted``."""
    drop = {t.strip().lower() for t in unwanted if t.strip()}
    return join_tags(t for t in split_tags(caption) if t.lower() not in drop)


def dedupe_tags(caption: str) -> str:
    """Keep the first of tags that repeat (ignoring case)."""
    seen: set[str] = set()
    out = []
    for tag in split_tags(caption):
        if tag.lower() not in seen:
            seen.add(tag.lower())
            out.append(tag)
    return join_tags(out)


def find_replace(caption: str, find: str, replace: str, regex: bool = False) -> str:
    """Replace text (plain or a regular expression); raises ``ValueError`` for a bad expression."""
    if not find:
        return caption
    if regex:
        try:
            return re.sub(find, replace, caption)
        except re.error as exc:
            raise ValueError(f"The search pattern '{find}' is not a valid regular expression ({exc}).") from None
    return caption.replace(find, replace)


def apply_edit(caption: str, edit: CaptionEdit) -> str:
    """One caption after ``edit``."""
    text = find_replace(caption, edit.find, edit.replace, edit.regex)
    if edit.remove_tags:
        text = remove_tags(text, edit.remove_tags)
    if edit.lowercase:
        text = text.lower()
    if edit.dedupe:
        text = dedupe_tags(text)
    tags = split_tags(text)
    prefix, suffix = edit.prefix.strip(), edit.suffix.strip()
    if prefix and not _has_leading(tags, prefix):
        tags = [prefix, *tags]
    if suffix and not (tags and tags[-1].lower() == suffix.lower()):
        tags = [*tags, suffix]
    changed_structure = bool(prefix or suffix or edit.remove_tags or edit.dedupe)
    text = join_tags(tags) if changed_structure else text.strip()
    if edit.trigger.strip():
        text = add_trigger(text, edit.trigger)
    return text


def apply_edits(captions: Mapping[K, str], edit: CaptionEdit) -> dict[K, str]:
    """Every caption after ``edit`` (same keys)."""
    return {key: apply_edit(text, edit) for key, text in captions.items()}


def preview_edits(captions: Mapping[K, str], edit: CaptionEdit,
                  changed_only: bool = True) -> list[tuple[K, str, str]]:
    """``(key, before, after)`` for each caption the edit would change (or all, with ``changed_only=False``)."""
    out = []
    for key, before in captions.items():
        after = apply_edit(before, edit)
        if after != before or not changed_only:
            out.append((key, before, after))
    return out
