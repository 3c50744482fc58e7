"""The Captioning tab through the real app's API (a ``--demo`` server on 127.0.0.1, gradio_client): each new
captioner on its tiny offline model, re-captioning one image, two captioners compared and merged, the token
column, and the sentence a model that cannot load offline gets."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from test_app_server import AppProcess

from lora_studio.data.captions import write_metadata_csv
from lora_studio.models.tiny import make_demo_images
from lora_studio.models.tiny_vlms import build_tiny_vlm_captioners

pytestmark = pytest.mark.slow
SETUP_DEFAULTS = {"max_tokens": 6, "style": "short"}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    outputs = tmp_path_factory.mktemp("caption-outputs")
    proc = AppProcess(["--demo", "--outputs", str(outputs)], outputs.parent / "caption_app.log")
    models = build_tiny_vlm_captioners(tmp_path_factory.mktemp("caption-models"))
    try:
        from gradio_client import Client

        yield Client(proc.wait_ready().url, verbose=False), outputs, models
    finally:
        proc.stop()


def _folder(tmp_path: Path) -> Path:
    folder = make_demo_images(tmp_path / "imgs", count=4, size=40, with_captions=False)
    (folder / "img_002.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # corrupt, in the middle
    write_metadata_csv(folder / "metadata.csv", {"img_003.png": "hand written"})
    return folder


def _run(client, folder, kinds, models, overwrite=False, **setup):
    refs = {"florence_model": str(models["florence2"]), "qwen_model": str(models["qwen-vl"]),
            "joy_model": str(models["joycaption"]), "wd14_model": str(models["wd14"])}
    return client.predict(folder_text=str(folder), kinds_v=kinds, trigger_v="mystyle", overwrite_v=overwrite,
                          **{**refs, **SETUP_DEFAULTS, **setup}, api_name="/run_captioning")


@pytest.mark.parametrize("kind", ["Florence-2", "Qwen-VL", "JoyCaption", "WD14 tags"])
def test_each_captioner_through_the_app(app, kind, tmp_path):
    client, _, models = app
    folder = _folder(tmp_path)
    table, status = _run(client, folder, [kind], models, family="sdxl")
    rows = {r[1]: r for r in table["data"]}
    assert sorted(rows) == ["img_000.png", "img_001.png", "img_003.png"]  # the corrupt one is left out
    assert "3 image(s) captioned: 2 new, 1 existing kept" in status and "img_002.png" in status
    assert rows["img_003.png"][2] == "mystyle, hand written"
    assert all(r[2].startswith("mystyle, ") and len(r[2]) > 9 for r in rows.values())
    assert all(r[3].startswith("about ") and r[3].split()[1].endswith("/77") for r in rows.values())


def test_qwen3_sentence_plus_wd14_tags_in_the_detailed_style(app, tmp_path):
    client, _, models = app
    folder = _folder(tmp_path)
    table, _ = _run(client, folder, ["WD14 tags", "Qwen-VL"], models, overwrite=True, family="flux",
                    style="detailed", qwen_model=str(models["qwen3-vl"]), rating=True)
    for row in table["data"]:
        sentence, tags = row[2].split(", general, ")  # the sentence first, the tags after it
        assert sentence.startswith("mystyle, ") and "no humans" in tags and row[3].endswith("/512")


def test_one_image_recaptioned_compared_and_merged(app, tmp_path):
    client, _, models = app
    folder = _folder(tmp_path)
    table, _ = _run(client, folder, ["WD14 tags"], models)
    before = {r[1]: r[2] for r in table["data"]}
    refs = {"florence_model": str(models["florence2"]), "wd14_model": str(models["wd14"]), **SETUP_DEFAULTS}
    table, status = client.predict(folder_text=str(folder), rows=table, file="img_003.png",
                                   kinds_v=["Florence-2"], trigger_v="mystyle", **refs, api_name="/recaption_image")
    after = {r[1]: r[2] for r in table["data"]}
    assert "re-captioned" in status and after["img_003.png"] != "mystyle, hand written"
    assert {k: v for k, v in after.items() if k != "img_003.png"} == \
        {k: v for k, v in before.items() if k != "img_003.png"}
    text_a, text_b = client.predict(folder_text=str(folder), file="img_000.png", label_a="WD14 tags",
                                    label_b="Florence-2", **refs, api_name="/compare_captioners")
    assert "no humans" in text_a and text_b and "no humans" not in text_b
    table, _ = client.predict(folder_text=str(folder), rows=table, file="img_000.png", trigger_v="mystyle",
                              placement="start", family="sd15", base_model="", text_a=text_a, text_b=text_b,
                              label_a="WD14 tags", label_b="Florence-2", api_name="/merge_captions")
    merged = {r[1]: r[2] for r in table["data"]}["img_000.png"]
    assert merged == f"mystyle, {text_b.rstrip('. ')}, {text_a}"  # the sentence first, the tags after it
    table, _ = client.predict(folder_text=str(folder), rows=table, file="img_000.png", trigger_v="",
                              placement="start", family="sd15", base_model="", text=text_b,
                              api_name="/use_caption_b")
    assert {r[1]: r[2] for r in table["data"]}["img_000.png"] == text_b


def test_a_model_that_cannot_load_offline_says_so(app, tmp_path):
    from gradio_client.exceptions import AppError

    client, _, models = app
    folder = make_demo_images(tmp_path / "imgs", count=1, size=40, with_captions=False)
    with pytest.raises(AppError, match="'florence-community/Florence-2-large' could not be loaded: it is not in "
                                       "the local Hugging Face cache"):
        client.predict(folder_text=str(folder), kinds_v=["Florence-2"], trigger_v="", overwrite_v=False,
                       api_name="/run_captioning")
    with pytest.raises(AppError, match="Select an image first"):
        client.predict(folder_text=str(folder), file="", label_a="WD14 tags", label_b="Florence-2",
                       wd14_model=str(models["wd14"]), api_name="/compare_captioners")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    with pytest.raises(AppError, match="is not an image in"):
        client.predict(folder_text=str(folder), file="../outside.png", label_a="WD14 tags", label_b="WD14 tags",
                       wd14_model=str(models["wd14"]), api_name="/compare_captioners")
