"""Scanning a messy folder: every problem is reported with what will be done, nothing is modified."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_studio.data.captions import read_metadata_csv
from lora_studio.data.prepare import prepare_dataset, resize_image
from lora_studio.data.scan import ROW_HEADERS, dhash, hamming, scan_folder
from lora_studio.data.tags import parse_repeats_folder, repeats_for, tag_frequency
from lora_studio.errors import DatasetError


def _noise(size, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _pattern(size, seed):
    """A smooth image with structure (so resized copies keep the same perceptual hash)."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    rng = np.random.default_rng(seed)
    a, b, c = rng.uniform(2, 6, 3)
    r = (np.sin(a * x * 6.28) * 0.5 + 0.5) * 255
    g = (np.cos(b * y * 6.28) * 0.5 + 0.5) * 255
    bl = (np.sin(c * (x + y) * 6.28) * 0.5 + 0.5) * 255
    return Image.fromarray(np.stack([r, g, bl], -1).astype(np.uint8))


def make_messy_folder(root: Path) -> dict[str, str]:
    """A folder with one file per kind of problem. Returns {relative name: expected skip reason or ''}."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "10_mystyle").mkdir()
    expected = {}

    def save(name, img, reason="", **kw):
        img.save(root / name, **kw)
        expected[name] = reason

    save("good 01.png", _pattern((64, 48), 1))
    save("10_mystyle/ünïcode ✓.JPG", _pattern((48, 64), 2), quality=95)
    save("rgba.png", Image.new("RGBA", (40, 40), (0, 0, 255, 128)))
    save("cmyk.jpg", Image.new("CMYK", (40, 40), (0, 200, 200, 0)))
    save("grey16.png", Image.fromarray(np.full((40, 40), 40000, dtype=np.uint16)))
    exif = Image.Exif()
    exif[0x0112] = 8
    save("rotated.jpg", _pattern((60, 40), 3), exif=exif, quality=95)
    frames = [_pattern((40, 40), s) for s in (4, 5)]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:])
    expected["anim.gif"] = ""
    save("tiny.png", _pattern((16, 16), 6), "too small")
    save("panorama.png", _pattern((400, 40), 7), "extreme aspect ratio")
    (root / "not_really.jpg").write_text("hello, I am text")
    expected["not_really.jpg"] = "unreadable"
    (root / "empty.png").write_bytes(b"")
    expected["empty.png"] = "empty"
    _noise((64, 64), 8).save(root / "noise.jpg", quality=95)
    data = (root / "noise.jpg").read_bytes()
    (root / "noise.jpg").unlink()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    expected["truncated.jpg"] = "unreadable"
    (root / "z_copy.png").write_bytes((root / "good 01.png").read_bytes())
    expected["z_copy.png"] = "duplicate"
    save("near good 01.png", _pattern((64, 48), 1).resize((62, 46)))
    (root / "notes.md").write_text("not an image")
    (root / "good 01.txt").write_text("a smooth pattern, colourful", encoding="utf-8")
    (root / "10_mystyle" / "ünïcode ✓.txt").write_text("mystyle, wavy lines", encoding="utf-8")
    return expected


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def messy(tmp_path) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "data"
    return root, make_messy_folder(root)


def test_scan_reports_each_problem(messy):
    root, expected = messy
    progress = []
    report = scan_folder(root, min_size=32, progress=lambda d, t, p: progress.append((d, t)))
    by_name = {c.name: c for c in report.items}
    assert set(by_name) == set(expected)
    for name, reason in expected.items():
        assert (by_name[name].skip_reason or "") == reason, (name, by_name[name].problems)
    assert progress[-1] == (len(expected), len(expected))
    assert by_name["rotated.jpg"].size_text == "40×60" and "turned upright" in by_name["rotated.jpg"].actions
    assert "composited on white" in by_name["rgba.png"].actions
    assert any("CMYK" in p for p in by_name["cmyk.jpg"].problems)
    assert any("16-bit" in p for p in by_name["grey16.png"].problems)
    assert any("animated" in p for p in by_name["anim.gif"].problems)
    assert by_name["z_copy.png"].duplicate_of == "good 01.png"
    assert by_name["near good 01.png"].near_duplicate_of == "good 01.png"
    assert by_name["rgba.png"].near_duplicate_of is None
    assert by_name["10_mystyle/ünïcode ✓.JPG"].repeats == 10
    assert by_name["good 01.png"].caption == "a smooth pattern, colourful"
    assert "no caption" in by_name["cmyk.jpg"].problems
    assert [p.name for p in report.ignored_files] == ["notes.md"]


def test_summary_sentence_and_rows(messy):
    root, expected = messy
    report = scan_folder(root, min_size=32)
    assert report.summary() == ("8 of 14 images usable, 6 skipped (2 unreadable, 1 empty, 1 too small, "
                                "1 extreme aspect ratio, 1 duplicate), 2 captioned")
    rows = report.rows()
    assert len(rows) == 14 and all(len(r) == len(ROW_HEADERS) for r in rows)
    row = {r[0]: r for r in rows}
    assert row["tiny.png"][3] == "skip" and "too small" in row["tiny.png"][2]
    assert row["rgba.png"][3].startswith("use (") and row["good 01.png"] == ["good 01.png", "64×48", "", "use"]
    assert len(report.rows(problems_only=True)) < len(rows)
    assert report.to_dict()["summary"] == report.summary()
    assert any("no caption" in n for n in report.notes())


def test_min_size_default_and_empty_folder(tmp_path, messy):
    root, _ = messy
    assert scan_folder(root).summary().startswith("0 of 14 images usable")  # default 256 px minimum
    (tmp_path / "empty").mkdir()
    assert scan_folder(tmp_path / "empty").summary().startswith("No images found")


def test_scan_cancel(messy):
    root, _ = messy
    cancel = threading.Event()
    report = scan_folder(root, min_size=32, progress=lambda d, t, p: cancel.set() if d == 3 else None,
                         cancel=cancel)
    assert len(report.items) == 3 and report.cancelled and "cancelled" in report.summary()


def test_prepare_copies_never_touch_originals(tmp_path, messy):
    root, _ = messy
    before = _digest(root)
    report = scan_folder(root, min_size=32)
    result = prepare_dataset(report, tmp_path / "prepared", resolution=32, mode="center_crop", captions="both")
    assert _digest(root) == before
    assert len(result.written) == len(report.usable) and not result.failed
    for dst in result.written.values():
        with Image.open(dst) as im:
            assert im.size == (32, 32) and im.mode == "RGB"
    assert (tmp_path / "prepared/10_mystyle/ünïcode ✓.png").is_file()
    assert read_metadata_csv(tmp_path / "prepared/metadata.csv") == {
        "10_mystyle/ünïcode ✓.png": "mystyle, wavy lines", "good 01.png": "a smooth pattern, colourful"}
    assert (tmp_path / "prepared/good 01.txt").read_text(encoding="utf-8") == "a smooth pattern, colourful"
    with pytest.raises(DatasetError, match="inside the image folder"):
        prepare_dataset(report, root / "out")
    with pytest.raises(DatasetError, match="contains it"):
        prepare_dataset(report, root)
    assert _digest(root) == before


def test_resize_modes():
    img = _pattern((200, 100), 1)
    assert resize_image(img, 64, "center_crop").size == (64, 64)
    assert resize_image(img, 64, "keep_aspect").size == (128, 64)
    assert resize_image(img, 512, "keep_aspect").size == (200, 100)  # never upscaled
    assert resize_image(img, 64, "copy") is img
    with pytest.raises(DatasetError):
        resize_image(img, 64, "stretch")


def test_dhash_stable_under_resize_and_distinct_otherwise():
    a = _pattern((128, 96), 1)
    assert hamming(dhash(a), dhash(a.resize((100, 75)))) <= 4
    assert hamming(dhash(a), dhash(_pattern((128, 96), 9))) > 10


def test_repeats_and_tag_frequency(tmp_path):
    assert parse_repeats_folder("10_mystyle") == (10, "mystyle")
    assert parse_repeats_folder("mystyle") is None and parse_repeats_folder("0_x") is None
    img = tmp_path / "5_style" / "sub" / "a.png"
    assert repeats_for(img) == 1
    assert repeats_for(img, root=tmp_path) == 5
    assert repeats_for(tmp_path / "3_cat" / "b.png") == 3
    freq = tag_frequency({tmp_path / "5_style" / "a.png": "mystyle, Red, circle",
                          tmp_path / "5_style" / "b.png": "mystyle, red",
                          tmp_path / "2_other" / "c.png": "mystyle"})
    assert freq == {"2_other": {"mystyle": 1}, "5_style": {"mystyle": 2, "red": 2, "circle": 1}}
