"""Captions on disk: metadata.csv and .txt sidecars, read, written, matched to images, converted."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_studio.data.captions import (csv_to_txt, load_captions, path_inside, read_metadata_csv, read_txt_captions,
                                       txt_to_csv, write_metadata_csv, write_txt_captions)
from lora_studio.errors import DatasetError

TRICKY = {
    "a.png": 'a cat, "quoted", with commas',
    "sub dir/ünï code.jpg": "line one\nline two, and more",
    "c.png": "  spaces kept  ",
}


def test_csv_round_trip_commas_quotes_newlines(tmp_path):
    path = tmp_path / "metadata.csv"
    write_metadata_csv(path, TRICKY)
    assert read_metadata_csv(path) == TRICKY
    assert path.read_text(encoding="utf-8").splitlines()[0] == "file_name,caption"


def test_csv_backup_kept_and_atomic(tmp_path):
    path = tmp_path / "metadata.csv"
    write_metadata_csv(path, {"a.png": "first"})
    write_metadata_csv(path, {"a.png": "second"})
    assert read_metadata_csv(path) == {"a.png": "second"}
    assert read_metadata_csv(tmp_path / "metadata.csv.bak") == {"a.png": "first"}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_csv_alternative_columns_bom_backslashes(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes('\ufeffImage,Prompt,extra\r\n.\\sub\\x.png,"hello, world",1\r\n'.encode("utf-8"))
    assert read_metadata_csv(path) == {"sub/x.png": "hello, world"}
    path.write_text("file,text\nx.png,hi\n", encoding="utf-8")
    assert read_metadata_csv(path) == {"x.png": "hi"}


def test_csv_missing_column_names_found_columns(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("name,description\nx.png,hi\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="'name', 'description'"):
        read_metadata_csv(path)
    with pytest.raises(DatasetError, match="not found"):
        read_metadata_csv(tmp_path / "none.csv")


def test_txt_sidecars_read_write_backup(tmp_path):
    imgs = [tmp_path / "one.png", tmp_path / "two.JPG"]
    write_txt_captions(tmp_path, {imgs[0]: "red circle", imgs[1]: "blue, square"})
    assert (tmp_path / "two.txt").read_text(encoding="utf-8") == "blue, square"
    write_txt_captions(tmp_path, {imgs[0]: "green circle"})
    assert (tmp_path / "one.txt.bak").read_text(encoding="utf-8") == "red circle"
    assert read_txt_captions(tmp_path, imgs) == {imgs[0]: "green circle", imgs[1]: "blue, square"}
    write_txt_captions(tmp_path, {"one.png": "x"}, extension="caption")
    assert read_txt_captions(tmp_path, ["one.png"], extension=".caption") == {Path("one.png"): "x"}


def test_load_captions_csv_first_then_sidecars(tmp_path):
    (tmp_path / "sub").mkdir()
    imgs = [tmp_path / "a.png", tmp_path / "b.png", tmp_path / "sub" / "c.png", tmp_path / "d.png"]
    write_metadata_csv(tmp_path / "metadata.csv", {"a.png": "from csv", "sub/c.png": "   ", "b.png": ""})
    (tmp_path / "a.txt").write_text("from txt a", encoding="utf-8")
    (tmp_path / "b.txt").write_text("from txt b", encoding="utf-8")
    (tmp_path / "d.txt").write_text("  \n", encoding="utf-8")
    caps = load_captions(tmp_path, imgs)
    assert caps == {imgs[0]: "from csv", imgs[1]: "from txt b"}
    with pytest.raises(DatasetError):
        load_captions(tmp_path, imgs, metadata_path=tmp_path / "other.csv")


def test_load_captions_csv_elsewhere_and_bare_names(tmp_path):
    data = tmp_path / "data"
    (data / "s").mkdir(parents=True)
    imgs = [data / "s" / "x.png", data / "y.png"]
    write_metadata_csv(tmp_path / "caps.csv", {"data/s/x.png": "via csv folder", "y.png": "direct"})
    assert load_captions(data, imgs, metadata_path=tmp_path / "caps.csv") == {imgs[0]: "via csv folder",
                                                                              imgs[1]: "direct"}
    write_metadata_csv(tmp_path / "bare.csv", {"x.png": "bare name"})
    assert load_captions(data, imgs, metadata_path=tmp_path / "bare.csv") == {imgs[0]: "bare name"}


def test_convert_both_ways(tmp_path):
    imgs = [tmp_path / "a.png", tmp_path / "b.png"]
    (tmp_path / "a.txt").write_text("kept sidecar", encoding="utf-8")
    write_metadata_csv(tmp_path / "metadata.csv", {"a.png": "csv a", "b.png": "csv b, with comma"})
    csv_to_txt(tmp_path / "metadata.csv", tmp_path, imgs)
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "kept sidecar"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "csv b, with comma"
    csv_to_txt(tmp_path / "metadata.csv", tmp_path, imgs, overwrite=True)
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "csv a"
    (tmp_path / "a.txt").write_text("edited", encoding="utf-8")
    out = tmp_path / "new.csv"
    txt_to_csv(tmp_path, imgs, out)
    assert read_metadata_csv(out) == {"a.png": "edited", "b.png": "csv b, with comma"}


def test_caption_names_outside_the_folder_are_refused(tmp_path):
    """A name from the app never chooses where a caption is written: absolute, ``..`` and links out are refused."""
    folder, victim = tmp_path / "data", tmp_path / "victim"
    folder.mkdir()
    victim.mkdir()
    (victim / "notes.txt").write_text("precious", encoding="utf-8")
    (folder / "out").symlink_to(victim)
    for bad in (str(victim / "abs.png"), "../victim/notes.png", "sub/../../victim/notes.png", "out/notes.png"):
        with pytest.raises(DatasetError, match="outside the image folder"):
            write_txt_captions(folder, {"fine.png": "ok", bad: "overwritten"})
        with pytest.raises(DatasetError, match="outside"):
            path_inside(folder, bad)
    assert (victim / "notes.txt").read_text(encoding="utf-8") == "precious"
    assert sorted(p.name for p in victim.iterdir()) == ["notes.txt"]  # no abs.txt, no .bak
    assert not (folder / "fine.txt").exists()  # a bad name stops the call before any write
    # Names inside the folder, relative or absolute, are written.
    written = write_txt_captions(folder, {"fine.png": "ok", str(folder / "sub" / "deep.png"): "deep"})
    assert written == [folder / "fine.txt", folder / "sub" / "deep.txt"]
    assert path_inside(folder, "sub/../x.png") == folder / "sub/../x.png"
