"""Captioners on tiny offline BLIP and CLIP models, the folder captioning job, and batch edits."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
from PIL import Image

from lora_studio.captioning.batch import caption_folder, caption_images
from lora_studio.captioning.blip import BlipCaptioner, clean_caption
from lora_studio.captioning.clip_tags import ClipStyleTagger
from lora_studio.captioning.edits import CaptionEdit, add_trigger, apply_edit, apply_edits, preview_edits
from lora_studio.captioning.vocabulary import STYLE_VOCABULARY
from lora_studio.data.captions import read_metadata_csv, write_metadata_csv
from lora_studio.errors import ModelLoadError
from lora_studio.models.tiny import make_demo_images
from lora_studio.models.tiny_captioners import build_tiny_blip, build_tiny_clip


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> Path:
    return build_tiny_blip(tmp_path_factory.mktemp("captioners") / "tiny-blip")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("captioners") / "tiny-clip")


def _blip(folder, **kw):
    return BlipCaptioner(folder, max_new_tokens=6, num_beams=1, batch_size=2, device="cpu", **kw)


def _bad_folder(tmp_path: Path) -> Path:
    """Demo images without captions, plus a corrupt file, a truncated one and a tricky file name."""
    folder = make_demo_images(tmp_path / "imgs", count=4, size=40, with_captions=False)
    (folder / "broken.png").write_text("not an image")
    data = (folder / "img_000.png").read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 3])
    Image.new("RGB", (40, 40), (9, 99, 199)).save(folder / "a, \"quoted\" name ü.JPG")
    return folder


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def test_blip_captions_progress_and_release(tiny_blip, tmp_path):
    folder = _bad_folder(tmp_path)
    paths = sorted(folder.iterdir())
    calls = []
    cap = _blip(tiny_blip)
    results = cap.caption(paths, progress=lambda d, t, p: calls.append((d, t)))
    assert [r.path for r in results] == paths
    bad = {r.path.name for r in results if not r.ok}
    assert bad == {"broken.png", "cut.png"}
    assert all(r.text.strip() for r in results if r.ok)
    assert calls[-1] == (len(paths), len(paths)) and len(calls) == 4  # 7 images, batches of 2
    assert not cap.loaded  # released after the batch
    with cap:
        cap.caption(paths[:1])
        assert cap.loaded  # kept while the caller holds it
    assert not cap.loaded


def test_blip_prefix_and_cancel(tiny_blip, tmp_path):
    folder = make_demo_images(tmp_path / "d", count=6, size=32, with_captions=False)
    paths = sorted(folder.glob("*.png"))
    results = _blip(tiny_blip, prefix="a painting of").caption(paths[:2])
    assert all(r.text.startswith("a painting of") for r in results)
    cancel = threading.Event()
    results = _blip(tiny_blip).caption(paths, progress=lambda d, t, p: cancel.set(), cancel=cancel)
    assert len(results) == 2  # stopped after the first batch


def test_clean_caption():
    assert clean_caption("arafed woman sitting on a bench .") == "woman sitting on a bench"
    assert clean_caption("a cat", prefix="a painting of") == "a painting of a cat"


def test_clip_style_tags_one_per_category(tiny_clip, tmp_path):
    folder = make_demo_images(tmp_path / "d", count=3, size=32, with_captions=False)
    tagger = ClipStyleTagger(tiny_clip, device="cpu")
    results = tagger.caption(sorted(folder.glob("*.png")))
    assert len(results) == 3 and not tagger.loaded
    for r in results:
        tags = r.text.split(", ")
        assert len(tags) == len(STYLE_VOCABULARY)
        for tag, terms in zip(tags, STYLE_VOCABULARY.values()):
            assert tag in terms
    with ClipStyleTagger(tiny_clip, categories=["lighting"], per_category=2, device="cpu") as t2:
        ranked = t2.rank_batch([Image.new("RGB", (32, 32), (200, 30, 30))])
        assert list(ranked[0]) == ["lighting"]
        scores = [s for _, s in ranked[0]["lighting"]]
        assert scores == sorted(scores, reverse=True) and len(scores) == len(STYLE_VOCABULARY["lighting"])
        assert len(t2.caption([Image.new("RGB", (32, 32))])[0].text.split(", ")) == 2


def test_model_load_errors_are_one_sentence(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        BlipCaptioner(tmp_path / "no" / "such" / "folder").load()
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        BlipCaptioner("nobody-here/no-such-blip-model").load()
    (tmp_path / "empty_model").mkdir()
    with pytest.raises(ModelLoadError, match="could not be loaded") as info:
        ClipStyleTagger(tmp_path / "empty_model").load()
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_caption_folder_every_usable_image_once(tiny_blip, tiny_clip, tmp_path):
    folder = _bad_folder(tmp_path)
    before = _digest(folder)
    run = caption_folder(folder, [_blip(tiny_blip), ClipStyleTagger(tiny_clip, device="cpu")], trigger="mystyle")
    rows = read_metadata_csv(folder / "metadata.csv")
    assert sorted(rows) == sorted(["img_000.png", "img_001.png", "img_002.png", "img_003.png",
                                   "a, \"quoted\" name ü.JPG"])
    for caption in rows.values():
        tags = caption.split(", ")
        assert tags[0] == "mystyle" and tags.count("mystyle") == 1
        assert tags[-1] in STYLE_VOCABULARY["colour"]
    assert {p.name for p in run.report.skipped} == {"broken.png", "cut.png"}
    after = _digest(folder)
    after.pop("metadata.csv")
    assert after == before  # originals byte-identical, nothing else written
    assert len(run.generated) == 5 and "5 image(s) captioned" in run.summary()


def test_existing_captions_kept_unless_overwrite(tiny_blip, tmp_path):
    folder = make_demo_images(tmp_path / "d", count=3, size=32, with_captions=False)
    write_metadata_csv(folder / "metadata.csv", {"img_000.png": "my own words, kept"})
    (folder / "img_001.txt").write_text("sidecar caption", encoding="utf-8")
    run = caption_folder(folder, [_blip(tiny_blip)], trigger="mystyle", write_txt=True)
    rows = read_metadata_csv(folder / "metadata.csv")
    assert rows["img_000.png"] == "mystyle, my own words, kept"
    assert rows["img_001.png"] == "mystyle, sidecar caption"
    assert rows["img_002.png"].startswith("mystyle, ") and len(rows) == 3
    assert sorted(p.name for p in run.kept) == ["img_000.png", "img_001.png"]
    assert read_metadata_csv(folder / "metadata.csv.bak") == {"img_000.png": "my own words, kept"}
    assert (folder / "img_002.txt").read_text(encoding="utf-8") == rows["img_002.png"]
    # second run: the trigger is not added twice, nothing regenerated
    caption_folder(folder, [_blip(tiny_blip)], trigger="mystyle")
    assert read_metadata_csv(folder / "metadata.csv") == rows
    run = caption_folder(folder, [_blip(tiny_blip)], overwrite=True)
    assert "my own words" not in read_metadata_csv(folder / "metadata.csv")["img_000.png"]
    assert len(run.generated) == 3 and not run.kept


def test_caption_images_cancel_keeps_old_captions(tiny_blip, tmp_path):
    folder = make_demo_images(tmp_path / "d", count=4, size=32, with_captions=False)
    paths = sorted(folder.glob("*.png"))
    cancel = threading.Event()
    cancel.set()
    run = caption_images(paths, [_blip(tiny_blip)], existing={paths[3]: "old"}, overwrite=True, cancel=cancel)
    assert run.cancelled and run.captions == {paths[3]: "old"} and not run.generated


def test_trigger_never_duplicated():
    assert add_trigger("a red circle", "mystyle") == "mystyle, a red circle"
    assert add_trigger("mystyle, a red circle", "mystyle") == "mystyle, a red circle"
    assert add_trigger("MyStyle,a red circle", "mystyle") == "MyStyle,a red circle"
    assert add_trigger("a red circle, mystyle, mystyle", "mystyle") == "mystyle, a red circle"
    assert add_trigger("mystyle painting of a cat", "mystyle") == "mystyle painting of a cat"
    assert add_trigger("", "mystyle") == "mystyle"


def test_batch_edits_and_preview():
    caps = {"a.png": "A Cat, sitting, a cat, blurry", "b.png": "dog, grass"}
    edit = CaptionEdit(trigger="MyStyle", prefix="photo", suffix="sharp", remove_tags=["blurry"],
                       dedupe=True, lowercase=True, find="sitting", replace="sitting down")
    assert apply_edit(caps["a.png"], edit) == "MyStyle, photo, a cat, sitting down, sharp"
    assert apply_edit("photo, x, sharp", CaptionEdit(prefix="photo", suffix="sharp")) == "photo, x, sharp"
    assert apply_edit("cat 1, cat 22", CaptionEdit(find=r"\d+", replace="N", regex=True)) == "cat N, cat N"
    with pytest.raises(ValueError, match="regular expression"):
        apply_edit("x", CaptionEdit(find="(", regex=True))
    preview = preview_edits(caps, CaptionEdit(remove_tags=["grass"]))
    assert preview == [("b.png", "dog, grass", "dog")]
    assert apply_edits(caps, CaptionEdit())["a.png"] == caps["a.png"] and CaptionEdit().is_noop()
    assert len(preview_edits(caps, CaptionEdit(), changed_only=False)) == 2
