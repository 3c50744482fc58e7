"""The Captioning tab's actions: load, run, cancel, re-caption one image, compare two captioners, keep or merge,
batch edits, save. ``CaptionActions(ctx)`` has them as methods; ``caption_tab`` wires them to its components.

Every action that runs a model takes the tab's captioner settings last (``CaptionSetup`` order), so the
same settings drive a whole run, one image and a comparison.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from ..captioning.edits import CaptionEdit, apply_edits, preview_edits
from ..captioning.style import place_trigger, shape_caption
from ..errors import DatasetError
from ..data.captions import (METADATA_NAME, load_captions, path_inside, relative_name, write_metadata_csv,
                             write_txt_captions)
from ..data.images import list_images
from .caption_choice import CaptionSetup, build_captioners, caption_table, cut_note, merge_pair
from .common import CancelFlags, friendly, progress_callback, session_key, thumbnail_html
from .context import StudioContext

_cancel = CancelFlags()


def rows_to_captions(rows) -> dict[str, str]:
    """The table's value (a DataFrame or a list of rows) -> ``{file: caption}``."""
    if rows is None:
        return {}
    values = rows.values.tolist() if hasattr(rows, "values") else list(rows)
    out: dict[str, str] = {}
    for row in values:
        if len(row) >= 3 and str(row[1] or "").strip():
            out[str(row[1]).strip()] = "" if row[2] is None else str(row[2])
    return out


def _table(root: Path, captions: dict[str, str], files: list[str], family: str | None = None,
           base_model: str | None = None) -> tuple[list[list[str]], int]:
    return caption_table(root, captions, files, family, base_model, _thumbnail)


def _thumbnail(root: Path, name: str) -> str:
    """The thumbnail of ``root/name``; a name from the page that leads outside the folder is not read."""
    try:
        return thumbnail_html(path_inside(root, name))
    except DatasetError:
        return "(outside the folder)"


def _captioners(ctx: StudioContext, kinds: list[str], setup: CaptionSetup):
    return build_captioners(kinds or [], setup.refs(), setup.options(), check_ref=ctx.policy.model_ref)


def _image(ctx: StudioContext, folder_text: str, file: str) -> tuple[Path, Path]:
    root = ctx.policy.folder(folder_text, "image folder")
    if not (file or "").strip():
        raise gr.Error("Select an image first: click its row in the table (or type its file name).")
    path = (root / file.strip()).resolve()
    if root.resolve() not in path.parents or not path.is_file():
        raise gr.Error(f"'{file}' is not an image in {root}; click a row of the table to select one.")
    return root, path


def _edit(trigger_v, prefix_v, suffix_v, remove_v, find_v, replace_v, regex_v, dedupe_v, lower_v) -> CaptionEdit:
    return CaptionEdit(trigger=trigger_v or "", prefix=prefix_v or "", suffix=suffix_v or "", find=find_v or "",
                       replace=replace_v or "", regex=bool(regex_v), dedupe=bool(dedupe_v), lowercase=bool(lower_v),
                       remove_tags=[t.strip() for t in (remove_v or "").split(",") if t.strip()])


class CaptionActions:
    """The tab's event functions (bound methods, wired by ``caption_tab``)."""

    def __init__(self, ctx: StudioContext):
        self.ctx = ctx

    @friendly
    def load(self, folder_text: str, family: str | None = None, base_model: str = ""):
        root = self.ctx.policy.folder(folder_text, "image folder")
        images = list_images(root)
        captions = {relative_name(p, root): c for p, c in load_captions(root, images).items()}
        files = [relative_name(p, root) for p in images]
        have = sum(1 for f in files if captions.get(f))
        rows, cut = _table(root, captions, files, family, base_model)
        return rows, f"{len(files)} image(s), {have} with a caption." + cut_note(cut, family)

    @friendly
    def run(self, folder_text: str, kinds_v: list[str], trigger_v: str, overwrite_v: bool, blip_model, clip_model,
            florence_model, qwen_model, joy_model, wd14_model, family, style, trigger_placement, base_model, task,
            instruction, four_bit, joy_type, joy_length, temperature, general_threshold, character_threshold, exclude,
            underscores_to_spaces, rating, max_tokens, request: gr.Request = None, progress=gr.Progress()):
        from ..captioning.batch import caption_images
        from ..data.scan import scan_folder

        setup = CaptionSetup.from_names(locals())
        root = self.ctx.policy.folder(folder_text, "image folder")
        captioners = _captioners(self.ctx, kinds_v, setup)
        cancel_flag = _cancel.fresh(session_key(request))
        progress(0, desc="Loading the captioning model")
        report = scan_folder(root, min_size=1, max_aspect=float("inf"))
        images = report.usable_images
        result = caption_images(images, captioners, load_captions(root, images), trigger=trigger_v or None,
                                overwrite=overwrite_v, progress=progress_callback(progress, "Captioning"),
                                cancel=cancel_flag, style=setup.style, trigger_placement=setup.trigger_placement)
        captions = {relative_name(p, root): c for p, c in result.captions.items()}
        files = [relative_name(p, root) for p in images]
        rows, cut = _table(root, captions, files, setup.family, setup.base_model)
        text = f"**{result.summary()}.** Not saved yet: check the captions, then press Save."
        text += cut_note(cut, setup.family)
        problems = [(check.path, "; ".join(check.problems)) for check in report.skipped]
        problems += list(result.failed.items())
        if problems:
            text += "\n" + "\n".join(f"- {Path(p).name}: {why}" for p, why in problems[:10])
        return rows, text

    @staticmethod
    def cancel(request: gr.Request = None) -> str:
        found = _cancel.cancel(session_key(request))
        return "Cancelling after the current batch ..." if found else "Nothing to cancel."

    @staticmethod
    def select(rows, evt: gr.SelectData):
        values = rows.values.tolist() if hasattr(rows, "values") else list(rows)
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        return str(values[row][1]) if 0 <= row < len(values) else gr.skip()

    def _with_caption(self, folder_text, rows, file, caption, family, base_model, note=""):
        root = self.ctx.policy.folder(folder_text, "image folder")
        captions = rows_to_captions(rows)
        captions[file.strip()] = caption
        table, cut = _table(root, captions, list(captions), family, base_model)
        return table, f"{file}: {note or 'caption set'}. Not saved yet." + cut_note(cut, family)

    @friendly
    def recaption(self, folder_text: str, rows, file: str, kinds_v: list[str], trigger_v: str, blip_model, clip_model,
                  florence_model, qwen_model, joy_model, wd14_model, family, style, trigger_placement, base_model,
                  task, instruction, four_bit, joy_type, joy_length, temperature, general_threshold,
                  character_threshold, exclude, underscores_to_spaces, rating, max_tokens, progress=gr.Progress()):
        from ..captioning.batch import caption_images

        setup = CaptionSetup.from_names(locals())
        _, path = _image(self.ctx, folder_text, file)
        captioners = _captioners(self.ctx, kinds_v, setup)
        progress(0, desc=f"Re-captioning {path.name}")
        result = caption_images([path], captioners, {}, trigger=trigger_v or None, overwrite=True,
                                style=setup.style, trigger_placement=setup.trigger_placement)
        if path in result.failed or path not in result.captions:
            raise gr.Error(f"{path.name} could not be captioned: {result.failed.get(path, 'no caption came back')}")
        return self._with_caption(folder_text, rows, file, result.captions[path], setup.family, setup.base_model,
                             "re-captioned")

    @friendly
    def compare(self, folder_text: str, file: str, label_a: str, label_b: str, blip_model, clip_model, florence_model,
                qwen_model, joy_model, wd14_model, family, style, trigger_placement, base_model, task, instruction,
                four_bit, joy_type, joy_length, temperature, general_threshold, character_threshold, exclude,
                underscores_to_spaces, rating, max_tokens, progress=gr.Progress()):
        setup = CaptionSetup.from_names(locals())
        _, path = _image(self.ctx, folder_text, file)
        texts = []
        for label in (label_a, label_b):
            progress(len(texts) / 2, desc=f"{label} on {path.name}")
            captioner = _captioners(self.ctx, [label], setup)[0]
            result = captioner.caption([path])[0]
            if not result.ok:
                raise gr.Error(f"{label} could not caption {path.name}: {result.error}")
            texts.append(shape_caption(result.text, setup.style, captioner.kind))
        return texts[0], texts[1]

    @friendly
    def set_caption(self, folder_text, rows, file, trigger_v, placement, family, base_model, text):
        _image(self.ctx, folder_text, file)
        return self._with_caption(folder_text, rows, file, place_trigger(text or "", trigger_v, placement), family,
                             base_model)

    @friendly
    def merge(self, folder_text, rows, file, trigger_v, placement, family, base_model, text_a, text_b, label_a,
              label_b):
        return self.set_caption(folder_text, rows, file, trigger_v, placement, family, base_model,
                           merge_pair(text_a or "", text_b or "", label_a, label_b))

    @staticmethod
    @friendly
    def preview(rows, *edit_args):
        changes = preview_edits(rows_to_captions(rows), _edit(*edit_args))
        if not changes:
            return [["", "(no caption would change)", ""]]
        return [[f, before, after] for f, before, after in changes]

    @friendly
    def apply(self, folder_text: str, rows, family, base_model, *edit_args):
        root = self.ctx.policy.folder(folder_text, "image folder")
        captions = rows_to_captions(rows)
        edited = apply_edits(captions, _edit(*edit_args))
        changed = sum(1 for k in captions if captions[k] != edited[k])
        table, cut = _table(root, edited, list(captions), family, base_model)
        return table, f"{changed} caption(s) changed in the table; not saved yet." + cut_note(cut, family)

    @friendly
    def save(self, folder_text: str, rows, formats_v: list[str]):
        root = self.ctx.policy.folder(folder_text, "image folder")
        captions = {f: c.strip() for f, c in rows_to_captions(rows).items() if c and c.strip()}
        if not captions:
            raise gr.Error("The table has no captions to save. Load or run captioning first.")
        if not formats_v:
            raise gr.Error("Choose metadata.csv and/or .txt files to save to.")
        for name in captions:  # names come from the page: each must stay inside the folder, before any write
            path_inside(root, name)
        written = []
        if "metadata.csv" in formats_v:
            written.append(write_metadata_csv(root / METADATA_NAME, captions))
        if ".txt files" in formats_v:
            written += write_txt_captions(root, captions)
        return (f"Saved {len(captions)} caption(s) ({len(written)} file(s) written in {root}; "
                "old versions kept as .bak).")

