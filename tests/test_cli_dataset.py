"""The ``caption`` and ``dataset`` command lines: exit codes, summaries, files written."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from lora_studio.cli_dataset import add_caption_parser, add_dataset_parser, main
from lora_studio.data.captions import read_metadata_csv, write_metadata_csv
from lora_studio.models.tiny import make_demo_images
from lora_studio.models.tiny_captioners import build_tiny_blip, build_tiny_clip

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("cli-models")
    return build_tiny_blip(base / "blip"), build_tiny_clip(base / "clip")


@pytest.fixture()
def folder(tmp_path) -> Path:
    folder = make_demo_images(tmp_path / "my images", count=3, size=48, with_captions=False)
    (folder / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return folder


def test_parsers_register_on_a_main_parser():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_caption_parser(sub)
    add_dataset_parser(sub)
    args = parser.parse_args(["caption", "--input", "x", "--output", "y.csv", "--trigger", "t", "--style-tags",
                              "--overwrite", "--txt", "--prefix", "a photo of"])
    assert args.func.__name__ == "cmd_caption" and args.style_tags and args.prefix == "a photo of"
    args = parser.parse_args(["dataset", "check", "d", "--min-size", "64"])
    assert args.func.__name__ == "cmd_dataset_check" and args.min_size == 64


@pytest.mark.slow
def test_caption_command(models, folder, capsys):
    blip, clip = models
    out = folder / "captions.csv"
    code = main(["caption", "--input", str(folder), "--output", str(out), "--model", str(blip), "--trigger",
                 "mystyle", "--style-tags", "--clip-model", str(clip), "--max-tokens", "5", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0
    assert "3 image(s) captioned: 3 new, 0 existing kept, 1 file(s) skipped by the check" in captured.out
    assert "skipped bad.jpg" in captured.err
    rows = read_metadata_csv(out)
    assert sorted(rows) == ["img_000.png", "img_001.png", "img_002.png"]
    assert all(c.startswith("mystyle, ") for c in rows.values())


def test_caption_command_keeps_edits_and_reports_missing_model(models, folder, capsys):
    blip, _ = models
    write_metadata_csv(folder / "metadata.csv", {"img_001.png": "hand written"})
    assert main(["caption", "--input", str(folder), "--output", str(folder / "metadata.csv"), "--model", str(blip),
                 "--max-tokens", "4", "--txt"]) == 0
    assert read_metadata_csv(folder / "metadata.csv")["img_001.png"] == "hand written"
    assert (folder / "img_000.txt").is_file()
    capsys.readouterr()
    assert main(["caption", "--input", str(folder), "--model", str(folder / "missing-model"), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: The captioning model folder") and "does not exist" in err


def test_caption_command_nothing_usable(models, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.png").write_bytes(b"")
    assert main(["caption", "--input", str(tmp_path / "empty"), "--model", str(models[0])]) == 1
    assert "No usable images" in capsys.readouterr().err


def test_dataset_check_command(folder, tmp_path, capsys):
    Image.new("RGB", (20, 20)).save(folder / "TINY.PNG")
    code = main(["dataset", "check", str(folder), "--min-size", "32", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 0
    assert "3 of 5 images usable, 2 skipped (1 unreadable, 1 too small), 0 captioned" in out
    assert "TINY.PNG" in out and "bad.jpg" in out and (tmp_path / "r.json").is_file()
    assert main(["dataset", "check", str(folder)]) == 1  # default 256 px: nothing usable
    assert main(["dataset", "check", str(tmp_path / "nope")]) == 2


def test_dataset_prepare_and_convert_commands(folder, tmp_path, capsys):
    write_metadata_csv(folder / "metadata.csv", {"img_000.png": "red, circle"})
    assert main(["dataset", "prepare", str(folder), "--output", str(tmp_path / "work"), "--resolution", "32",
                 "--min-size", "32"]) == 0
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == [
        "img_000.png", "img_000.txt", "img_001.png", "img_002.png", "metadata.csv"]
    assert main(["dataset", "convert", str(folder), "--to", "txt"]) == 0
    assert (folder / "img_000.txt").read_text(encoding="utf-8") == "red, circle"
    (folder / "img_001.txt").write_text("blue", encoding="utf-8")
    assert main(["dataset", "convert", str(folder), "--to", "csv"]) == 0
    assert read_metadata_csv(folder / "metadata.csv") == {"img_000.png": "red, circle", "img_001.png": "blue"}


def test_module_entry_point(folder):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "lora_studio.cli_dataset", "dataset", "check", str(folder),
                           "--min-size", "16"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "3 of 4 images usable, 1 skipped (1 unreadable), 0 captioned" in proc.stdout


def test_relative_folder_keeps_txt_captions(tmp_path, monkeypatch, capsys):
    """`data` or `./data` with kohya .txt captions: every command finds them (no `data/data/...`)."""
    make_demo_images(tmp_path / "data", count=3, size=48)
    monkeypatch.chdir(tmp_path)
    for folder in ("data", "./data"):
        assert main(["dataset", "check", folder, "--min-size", "32"]) == 0
        assert "3 of 3 images usable, 3 captioned" in capsys.readouterr().out
    assert main(["dataset", "convert", "data", "--to", "csv"]) == 0
    rows = read_metadata_csv(tmp_path / "data" / "metadata.csv")
    assert rows == {f"img_{i:03d}.png": f"a {c} {s} on a light background"
                    for i, (c, s) in enumerate([("red", "circle"), ("green", "square"), ("blue", "circle")])}
    write_metadata_csv(tmp_path / "data" / "metadata.csv", {**rows, "img_000.png": "from the csv"})
    assert main(["dataset", "convert", "./data", "--to", "txt", "--overwrite"]) == 0
    assert (tmp_path / "data" / "img_000.txt").read_text(encoding="utf-8") == "from the csv"
    assert not (tmp_path / "data" / "data").exists()
    assert main(["dataset", "prepare", "data", "--output", "work", "--resolution", "32", "--min-size", "32",
                 "--captions", "both"]) == 0
    assert (tmp_path / "work" / "img_000.txt").read_text(encoding="utf-8") == "from the csv"
    assert len(read_metadata_csv(tmp_path / "work" / "metadata.csv")) == 3
