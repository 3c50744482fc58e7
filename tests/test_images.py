"""Image loading: every odd format becomes upright 8-bit RGB, and bad files fail with DatasetError."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lora_studio.data.images import IMAGE_EXTENSIONS, is_image_file, list_images, load_image_rgb
from lora_studio.errors import DatasetError


def test_is_image_file_case_insensitive():
    assert is_image_file("a/B.PNG") and is_image_file("x.JpEg") and is_image_file("f.tiff")
    assert not is_image_file("notes.txt") and not is_image_file("metadata.csv") and not is_image_file("png")
    assert ".gif" in IMAGE_EXTENSIONS and ".webp" in IMAGE_EXTENSIONS


def test_list_images_recursive_sorted_and_skips_hidden(tmp_path):
    (tmp_path / "sub dir").mkdir()
    (tmp_path / ".cache").mkdir()
    for rel in ["b.png", "A.JPG", "sub dir/ç é.webp", ".cache/x.png", "notes.txt", ".hidden.png"]:
        (tmp_path / rel).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert found == ["A.JPG", "b.png", "sub dir/ç é.webp"]
    assert [p.name for p in list_images(tmp_path, recursive=False)] == ["A.JPG", "b.png"]
    with pytest.raises(DatasetError, match="does not exist"):
        list_images(tmp_path / "nope")


def test_rgba_composited_on_white(tmp_path):
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0, 255))
    img.save(tmp_path / "a.png")
    out = load_image_rgb(tmp_path / "a.png")
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 0, 0) and out.getpixel((5, 5)) == (255, 255, 255)


def test_palette_with_transparency_and_la(tmp_path):
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.info["transparency"] = 0
    p.putpixel((0, 0), 0)
    p.save(tmp_path / "p.png", transparency=0)
    out = load_image_rgb(tmp_path / "p.png")
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((2, 2)) == (10, 200, 30)
    Image.new("LA", (4, 4), (50, 255)).save(tmp_path / "la.png")
    assert load_image_rgb(tmp_path / "la.png").getpixel((1, 1)) == (50, 50, 50)


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    r, g, b = load_image_rgb(tmp_path / "c.jpg").getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60


def test_16bit_scaled_not_clipped(tmp_path):
    arr = np.full((8, 8), 32896, dtype=np.uint16)  # 50 % grey in 16 bits
    arr[0, 0] = 65535
    Image.fromarray(arr).save(tmp_path / "g16.png")
    out = load_image_rgb(tmp_path / "g16.png")
    assert out.mode == "RGB"
    assert out.getpixel((4, 4)) == (128, 128, 128)
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_float_tiff(tmp_path):
    arr = np.full((4, 4), 0.5, dtype=np.float32)
    Image.fromarray(arr).save(tmp_path / "f.tif")
    assert load_image_rgb(tmp_path / "f.tif").getpixel((1, 1)) == (128, 128, 128)


def test_exif_rotation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    img.save(tmp_path / "r.jpg", exif=exif)
    assert load_image_rgb(tmp_path / "r.jpg").size == (20, 40)


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(tmp_path / "anim.GIF", save_all=True, append_images=frames[1:], duration=50)
    r, g, b = load_image_rgb(tmp_path / "anim.GIF").getpixel((4, 4))
    assert r > 200 and b < 50


def test_bad_files_raise_dataset_error(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not an image")
    buf = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, quality=95)
    data = buf.read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    png = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(png)
    (tmp_path / "trunc.png").write_bytes(png.read_bytes()[:300])
    with pytest.raises(DatasetError, match="empty"):
        load_image_rgb(tmp_path / "empty.png")
    with pytest.raises(DatasetError, match="not an image"):
        load_image_rgb(tmp_path / "text.jpg")
    with pytest.raises(DatasetError, match="truncated|damaged"):
        load_image_rgb(tmp_path / "trunc.jpg")
    with pytest.raises(DatasetError, match="truncated|damaged"):
        load_image_rgb(tmp_path / "trunc.png")
    with pytest.raises(DatasetError, match="not found"):
        load_image_rgb(tmp_path / "missing.png")
    assert load_image_rgb(buf).size == (64, 64)
