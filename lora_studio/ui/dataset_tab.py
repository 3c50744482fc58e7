"""Dataset tab: pick a folder (or upload images), see thumbnails and problems, prepare a working copy.

The folder is checked (exists, readable, allowed when shared), scanned by ``data.scan.scan_folder`` and
shown as a gallery, a one-line summary and a table of problems. "Prepare" writes resized upright copies
with their captions into ``outputs/datasets/<name>`` (the originals are never touched). The folder in use
(scanned or prepared) is passed on to the Captioning and Training tabs.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from ..data.images import is_image_file
from ..data.prepare import CAPTION_FORMATS, MODES, prepare_dataset
from ..data.scan import DEFAULT_MAX_ASPECT, DEFAULT_MIN_SIZE, ROW_HEADERS, ScanReport, scan_folder
from .common import friendly, progress_callback, thumbnail
from .context import StudioContext

GALLERY_LIMIT = 120
UPLOAD_SUFFIXES = (".txt", ".csv")


def _gallery(report: ScanReport) -> list[tuple]:
    items = []
    for check in report.usable[:GALLERY_LIMIT]:
        img = thumbnail(check.path, 192)
        if img is not None:
            note = f" ({'; '.join(check.problems)})" if check.problems else ""
            items.append((img, check.name + note))
    return items


def _summary(report: ScanReport) -> str:
    lines = [f"**{report.summary()}**"]
    lines += [f"- {note}" for note in report.notes()]
    if len(report.usable) > GALLERY_LIMIT:
        lines.append(f"- The gallery shows the first {GALLERY_LIMIT} images.")
    if report.usable and not report.captioned_count:
        lines.append("- Next: caption the images in the **Captioning** tab.")
    return "\n".join(lines)


def _layout(demo) -> SimpleNamespace:
    """The tab's components: folder and upload, limits, summary, gallery, problems, prepare."""
    c = SimpleNamespace()
    gr.Markdown("Choose the folder with your training images, or upload them. The check lists unreadable, tiny, "
                "duplicate and uncaptioned images; nothing in your folder is changed.")
    with gr.Row(equal_height=True):
        c.folder = gr.Textbox(label="Image folder", value=str(demo.images) if demo else "", scale=5,
                              placeholder="e.g. C:\\Users\\me\\Pictures\\my_style  or  /home/me/my_style",
                              info="Sub-folders named like 10_mystyle repeat their images 10 times (kohya style).")
        c.scan_btn = gr.Button("Check folder", variant="primary", scale=1)
    with gr.Accordion("... or upload images (and .txt captions)", open=False):
        c.upload = gr.File(label="Images", file_count="multiple", file_types=["image", *UPLOAD_SUFFIXES])
    with gr.Row():
        c.min_size = gr.Number(label="Smallest side allowed (px)", value=32 if demo else DEFAULT_MIN_SIZE,
                               precision=0, minimum=1, info="Smaller images are skipped.")
        c.max_aspect = gr.Number(label="Widest aspect ratio allowed", value=DEFAULT_MAX_ASPECT, minimum=1.0,
                                 info="e.g. 4 means 4:1.")
    c.summary = gr.Markdown(elem_id="dataset-summary")
    c.gallery = gr.Gallery(label="Usable images", columns=8, height=260, object_fit="cover", allow_preview=True)
    c.problems = gr.Dataframe(headers=ROW_HEADERS, label="Files with a problem (and what will be done)",
                              interactive=False, max_height=260, wrap=True)
    with gr.Accordion("Prepare a working copy (resize, turn upright, convert to RGB)", open=True):
        with gr.Row():
            c.resolution = gr.Number(label="Resolution (px)", value=64 if demo else 512, precision=0, minimum=64)
            c.mode = gr.Dropdown(label="Resize", choices=list(MODES), value="keep_aspect",
                                 info="center_crop: square crops; keep_aspect: shrink only (for buckets); copy.")
            c.captions = gr.Dropdown(label="Captions", choices=list(CAPTION_FORMATS), value="both",
                                     info="Write captions as .txt files, metadata.csv, both or none.")
        c.out_folder = gr.Textbox(label="Working folder (empty: a new folder in outputs/datasets)", value="")
        c.prepare_btn = gr.Button("Prepare")
        c.prepare_status = gr.Markdown()
    c.dataset_dir = gr.Textbox(label="Dataset used by the Captioning and Training tabs", interactive=False,
                               value=str(demo.images) if demo else "")
    return c


def _scan(ctx: StudioContext, folder_text: str, min_px: float, aspect: float, progress) -> tuple:
    root = ctx.policy.folder(folder_text, "image folder")
    report = scan_folder(root, min_size=int(min_px or 1), max_aspect=float(aspect or DEFAULT_MAX_ASPECT),
                         progress=progress_callback(progress, "Checking"))
    rows = sorted(report.rows(problems_only=True), key=lambda r: r[3] != "skip")  # skipped files first
    rows = rows or [["", "", "no problems found", ""]]
    return _summary(report), _gallery(report), rows, str(root)


def _receive_upload(ctx: StudioContext, files: list[str] | None) -> str:
    """Copy uploaded images (and their .txt captions) into a new folder under outputs/uploads."""
    if not files:
        raise gr.Error("No files received.")
    target = ctx.uploads / time.strftime("upload-%Y%m%d-%H%M%S")
    n = 1
    while target.exists():
        n += 1
        target = target.with_name(f"{target.name.split('~')[0]}~{n}")
    target.mkdir(parents=True)
    kept = 0
    for f in files:
        src = Path(f)
        if is_image_file(src) or src.suffix.lower() in UPLOAD_SUFFIXES:
            shutil.copyfile(src, target / src.name)
            kept += int(is_image_file(src))
    if not kept:
        shutil.rmtree(target, ignore_errors=True)
        raise gr.Error("None of the uploaded files is an image (jpg, png, webp, bmp, tiff, gif).")
    gr.Info(f"{kept} image(s) uploaded to {target}.")
    return str(target)


def _prepare(ctx: StudioContext, folder_text: str, min_px: float, aspect: float, res: float, mode: str, caps: str,
             out: str, progress) -> tuple[str, str]:
    root = ctx.policy.folder(folder_text, "image folder")
    report = scan_folder(root, min_size=int(min_px or 1), max_aspect=float(aspect or DEFAULT_MAX_ASPECT),
                         progress=progress_callback(progress, "Checking", 0.0, 0.3))
    if not report.usable:
        raise gr.Error(f"Nothing to prepare: {report.summary()}")
    target = Path(out.strip()) if out and out.strip() else ctx.datasets_dir / f"{root.name}_{int(res)}px"
    if not ctx.policy.allows(target):
        raise gr.Error(f"The working folder '{target}' is outside the folders this shared app may write to.")
    result = prepare_dataset(report, target, resolution=int(res), mode=mode, captions=caps,
                             progress=progress_callback(progress, "Preparing", 0.3, 0.7))
    text = f"**{result.summary()}.**"
    if result.failed:
        text += "\n" + "\n".join(f"- {p.name}: {why}" for p, why in list(result.failed.items())[:10])
    return text, str(result.output_dir)


def build_dataset_tab(ctx: StudioContext) -> dict[str, gr.components.Component]:
    """Build the Dataset tab's components and events; returns the components by id."""
    c = _layout(ctx.demo)

    @friendly
    def scan(folder_text: str, min_px: float, aspect: float, progress=gr.Progress()):
        return _scan(ctx, folder_text, min_px, aspect, progress)

    @friendly
    def receive_upload(files: list[str] | None) -> str:
        return _receive_upload(ctx, files)

    @friendly
    def prepare(folder_text: str, min_px: float, aspect: float, res: float, mode_v: str, caps: str, out: str,
                progress=gr.Progress()):
        return _prepare(ctx, folder_text, min_px, aspect, res, mode_v, caps, out, progress)

    scanned = [c.summary, c.gallery, c.problems, c.dataset_dir]
    c.scan_btn.click(scan, [c.folder, c.min_size, c.max_aspect], scanned, api_name="scan_dataset")
    c.folder.submit(scan, [c.folder, c.min_size, c.max_aspect], scanned, api_visibility="private")
    c.upload.upload(receive_upload, [c.upload], [c.folder], api_name="upload_images").then(
        scan, [c.folder, c.min_size, c.max_aspect], scanned, api_visibility="private")
    c.prepare_btn.click(prepare, [c.folder, c.min_size, c.max_aspect, c.resolution, c.mode, c.captions, c.out_folder],
                        [c.prepare_status, c.dataset_dir], api_name="prepare_dataset")
    return {"folder": c.folder, "scan": c.scan_btn, "upload": c.upload, "summary": c.summary, "gallery": c.gallery,
            "problems": c.problems, "prepare": c.prepare_btn, "prepare_status": c.prepare_status,
            "dataset_dir": c.dataset_dir}
