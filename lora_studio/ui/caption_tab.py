"""Captioning tab: caption with BLIP and/or CLIP style tags, edit in a table, batch edits with preview, save.

"Run" captions the images that have no caption yet (or all, with "Replace existing"), with a progress bar
and a Cancel button (what was captioned before Cancel is kept). The table shows a thumbnail, the file and
its caption; captions are edited in place. Nothing is written until "Save", which writes ``metadata.csv``
and/or ``.txt`` files atomically (the previous versions are kept as ``.bak``).
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from ..captioning.edits import CaptionEdit, apply_edits, preview_edits
from ..data.captions import METADATA_NAME, load_captions, relative_name, write_metadata_csv, write_txt_captions
from ..data.images import list_images
from .common import CancelFlags, friendly, progress_callback, session_key, thumbnail_html
from .context import StudioContext

CAPTIONERS = ("BLIP caption", "CLIP style tags")
SAVE_FORMATS = ("metadata.csv", ".txt files")
HEADERS = ["image", "file", "caption"]
_cancel = CancelFlags()


def _table(root: Path, captions: dict[str, str], files: list[str]) -> list[list[str]]:
    return [[thumbnail_html(root / f), f, captions.get(f, "")] for f in files]


def _rows_to_captions(rows) -> dict[str, str]:
    """The table's value (a DataFrame or a list of rows) -> ``{file: caption}``."""
    if rows is None:
        return {}
    values = rows.values.tolist() if hasattr(rows, "values") else list(rows)
    out: dict[str, str] = {}
    for row in values:
        if len(row) >= 3 and str(row[1] or "").strip():
            out[str(row[1]).strip()] = "" if row[2] is None else str(row[2])
    return out


def _make_captioners(kinds: list[str], blip_ref: str, clip_ref: str, ctx: StudioContext):
    from ..captioning.blip import BlipCaptioner
    from ..captioning.clip_tags import ClipStyleTagger

    out = []
    if "BLIP caption" in kinds:
        out.append(BlipCaptioner(ctx.policy.model_ref(blip_ref, "BLIP model")))
    if "CLIP style tags" in kinds:
        out.append(ClipStyleTagger(ctx.policy.model_ref(clip_ref, "CLIP model")))
    if not out:
        raise gr.Error("Pick at least one captioner (BLIP caption and/or CLIP style tags).")
    return out


def build_caption_tab(ctx: StudioContext) -> dict[str, gr.components.Component]:
    """Build the Captioning tab's components and events; returns the components by id."""
    from ..captioning.blip import DEFAULT_BLIP
    from ..captioning.clip_tags import DEFAULT_CLIP

    demo = ctx.demo
    gr.Markdown("Auto-caption the images, then read and fix the captions. A **trigger word** (a made-up word "
                "such as `mystyle`) at the start of every caption is what you will type later to call the LoRA.")
    with gr.Row(equal_height=True):
        folder = gr.Textbox(label="Image folder", value=str(demo.images) if demo else "", scale=5)
        load_btn = gr.Button("Load captions", scale=1)
    with gr.Row():
        kinds = gr.CheckboxGroup(list(CAPTIONERS), value=["BLIP caption"], label="Captioners",
                                 info="BLIP writes a sentence; CLIP adds style tags (medium, lighting, ...).")
        trigger = gr.Textbox(label="Trigger word", value=demo.trigger if demo else "", placeholder="mystyle")
        overwrite = gr.Checkbox(label="Replace existing captions", value=False,
                                info="Off: only images without a caption are captioned.")
    with gr.Accordion("Captioning models", open=False):
        blip_model = gr.Textbox(label="BLIP model (hub id or folder)", value=str(demo.blip) if demo else DEFAULT_BLIP)
        clip_model = gr.Textbox(label="CLIP model (hub id or folder)", value=str(demo.clip) if demo else DEFAULT_CLIP)
    with gr.Row():
        run_btn = gr.Button("Run captioning", variant="primary")
        cancel_btn = gr.Button("Cancel", variant="stop")
    status = gr.Markdown(elem_id="caption-status")
    table = gr.Dataframe(headers=HEADERS, datatype=["html", "str", "str"], label="Captions (click a caption to edit)",
                         interactive=True, static_columns=[0, 1], column_widths=["80px", "22%", "70%"], wrap=True,
                         max_height=460, row_count=0)
    with gr.Accordion("Batch edit (preview before applying)", open=False):
        with gr.Row():
            prefix = gr.Textbox(label="Add at the start")
            suffix = gr.Textbox(label="Add at the end")
            remove = gr.Textbox(label="Remove tags (comma separated)")
        with gr.Row():
            find = gr.Textbox(label="Find")
            replace = gr.Textbox(label="Replace with")
            regex = gr.Checkbox(label="Regular expression")
            dedupe = gr.Checkbox(label="Remove repeated tags")
            lowercase = gr.Checkbox(label="Lower-case")
        with gr.Row():
            preview_btn = gr.Button("Preview")
            apply_btn = gr.Button("Apply to the table")
        preview = gr.Dataframe(headers=["file", "before", "after"], interactive=False, wrap=True, max_height=300)
    with gr.Row(equal_height=True):
        formats = gr.CheckboxGroup(list(SAVE_FORMATS), value=list(SAVE_FORMATS), label="Save as")
        save_btn = gr.Button("Save captions", variant="primary")
    save_status = gr.Markdown(elem_id="caption-save-status")

    @friendly
    def load(folder_text: str):
        root = ctx.policy.folder(folder_text, "image folder")
        images = list_images(root)
        captions = {relative_name(p, root): c for p, c in load_captions(root, images).items()}
        files = [relative_name(p, root) for p in images]
        have = sum(1 for f in files if captions.get(f))
        return _table(root, captions, files), f"{len(files)} image(s), {have} with a caption."

    @friendly
    def run(folder_text: str, kinds_v: list[str], trigger_v: str, overwrite_v: bool, blip_ref: str,
            clip_ref: str, request: gr.Request = None, progress=gr.Progress()):
        from ..captioning.batch import caption_images
        from ..data.scan import scan_folder

        root = ctx.policy.folder(folder_text, "image folder")
        captioners = _make_captioners(kinds_v or [], blip_ref, clip_ref, ctx)
        cancel = _cancel.fresh(session_key(request))
        progress(0, desc="Loading the captioning model")
        report = scan_folder(root, min_size=1, max_aspect=float("inf"))
        images = report.usable_images
        existing = load_captions(root, images)
        result = caption_images(images, captioners, existing, trigger=trigger_v or None, overwrite=overwrite_v,
                                progress=progress_callback(progress, "Captioning"), cancel=cancel)
        captions = {relative_name(p, root): c for p, c in result.captions.items()}
        files = [relative_name(p, root) for p in images]
        text = f"**{result.summary()}.** Not saved yet: check the captions, then press Save."
        if result.failed:
            text += "\n" + "\n".join(f"- {Path(p).name}: {why}" for p, why in list(result.failed.items())[:10])
        return _table(root, captions, files), text

    def cancel(request: gr.Request = None) -> str:
        found = _cancel.cancel(session_key(request))
        return "Cancelling after the current batch ..." if found else "Nothing to cancel."

    def _edit(trigger_v, prefix_v, suffix_v, remove_v, find_v, replace_v, regex_v, dedupe_v, lower_v) -> CaptionEdit:
        return CaptionEdit(trigger=trigger_v or "", prefix=prefix_v or "", suffix=suffix_v or "", find=find_v or "",
                           replace=replace_v or "", regex=bool(regex_v), dedupe=bool(dedupe_v),
                           lowercase=bool(lower_v),
                           remove_tags=[t.strip() for t in (remove_v or "").split(",") if t.strip()])

    @friendly
    def do_preview(rows, *edit_args):
        changes = preview_edits(_rows_to_captions(rows), _edit(*edit_args))
        if not changes:
            return [["", "(no caption would change)", ""]]
        return [[f, before, after] for f, before, after in changes]

    @friendly
    def do_apply(folder_text: str, rows, *edit_args):
        root = ctx.policy.folder(folder_text, "image folder")
        captions = _rows_to_captions(rows)
        edited = apply_edits(captions, _edit(*edit_args))
        changed = sum(1 for k in captions if captions[k] != edited[k])
        return _table(root, edited, list(captions)), f"{changed} caption(s) changed in the table; not saved yet."

    @friendly
    def save(folder_text: str, rows, formats_v: list[str]):
        root = ctx.policy.folder(folder_text, "image folder")
        captions = {f: c.strip() for f, c in _rows_to_captions(rows).items() if c and c.strip()}
        if not captions:
            raise gr.Error("The table has no captions to save. Load or run captioning first.")
        if not formats_v:
            raise gr.Error("Choose metadata.csv and/or .txt files to save to.")
        written = []
        if "metadata.csv" in formats_v:
            written.append(write_metadata_csv(root / METADATA_NAME, captions))
        if ".txt files" in formats_v:
            written += write_txt_captions(root, captions)
        return (f"Saved {len(captions)} caption(s) ({len(written)} file(s) written in {root}; "
                "old versions kept as .bak).")

    edit_inputs = [trigger, prefix, suffix, remove, find, replace, regex, dedupe, lowercase]
    load_btn.click(load, [folder], [table, status], api_name="load_captions")
    run_evt = run_btn.click(run, [folder, kinds, trigger, overwrite, blip_model, clip_model], [table, status],
                            api_name="run_captioning", concurrency_id="gpu", concurrency_limit=1)
    cancel_btn.click(cancel, None, [status], api_name="cancel_captioning", queue=False)
    preview_btn.click(do_preview, [table, *edit_inputs], [preview], api_name="preview_caption_edit")
    apply_btn.click(do_apply, [folder, table, *edit_inputs], [table, save_status], api_name="apply_caption_edit")
    save_btn.click(save, [folder, table, formats], [save_status], api_name="save_captions")
    return {"folder": folder, "table": table, "status": status, "run": run_btn, "cancel": cancel_btn,
            "save": save_btn, "save_status": save_status, "trigger": trigger, "run_event": run_evt, "load_fn": load}
