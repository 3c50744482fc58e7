"""Florence-2, Qwen2.5-VL, Qwen3-VL, JoyCaption and WD14 captioners on tiny offline models of each architecture:
through the engine and the ``caption`` command line; caption styles, trigger placement, token-length checks."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from lora_studio.captioning.choose import CaptionerOptions, detect_captioner, make_captioner
from lora_studio.captioning.florence import FlorenceCaptioner
from lora_studio.captioning.joycaption import joycaption_prompt
from lora_studio.captioning.qwen_vl import IMAGE_PAD, QwenVLCaptioner
from lora_studio.captioning.style import default_style, merge_parts, place_trigger, shape_caption
from lora_studio.captioning.token_limits import TokenCounter, check_lengths, estimate_tokens
from lora_studio.captioning.wd14 import WD14Tagger
from lora_studio.cli_dataset import main
from lora_studio.data.captions import read_metadata_csv, write_metadata_csv
from lora_studio.errors import ModelLoadError
from lora_studio.models.tiny import make_demo_images
from lora_studio.models.tiny_captioners import build_tiny_blip
from lora_studio.models.tiny_vlms import build_tiny_vlm_captioners

GENERATIVE = ["florence2", "qwen-vl", "qwen3-vl", "joycaption"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("vlms")
    return {**build_tiny_vlm_captioners(base), "blip": build_tiny_blip(base / "tiny-blip")}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread than on two busy cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _options(**changes) -> CaptionerOptions:
    return CaptionerOptions(device="cpu", max_new_tokens=6, **changes)


def _captioner(models, name: str, **changes):
    kind = "qwen-vl" if name == "qwen3-vl" else name
    return make_captioner(str(models[name]), _options(**changes), kind=kind)


def _folder_with_bad_middle(tmp_path: Path) -> Path:
    folder = make_demo_images(tmp_path / "imgs", count=4, size=40, with_captions=False)
    Image.new("RGB", (90, 30), (200, 30, 30)).save(folder / "img_001_wide.png")  # another size in the batch
    (folder / "img_002.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")       # corrupt, in the middle
    return folder


@pytest.mark.parametrize("name", GENERATIVE + ["wd14"])
def test_a_batch_with_a_corrupt_image_in_the_middle(models, name, tmp_path):
    folder = _folder_with_bad_middle(tmp_path)
    paths = sorted(folder.glob("*.png"))
    captioner = _captioner(models, name, batch_size=8)
    results = captioner.caption(paths)
    assert [r.path for r in results] == paths and not captioner.loaded  # released after the batch
    bad = [r for r in results if not r.ok]
    assert [r.path.name for r in bad] == ["img_002.png"] and "img_002.png" in bad[0].error
    assert all(r.text.strip() for r in results if r.ok)


def test_florence_tasks_and_style_defaults(models):
    assert _captioner(models, "florence2", style="detailed").task == "more_detailed"
    assert _captioner(models, "florence2", style="short").task == "caption"
    assert _captioner(models, "florence2", style="short", task="detailed").task == "detailed"
    with pytest.raises(ValueError, match="not one of caption, detailed, more_detailed"):
        FlorenceCaptioner(models["florence2"], task="paragraph")
    with pytest.raises(ModelLoadError, match="never runs; use the converted checkpoint 'florence-community/"):
        FlorenceCaptioner("microsoft/Florence-2-large").load()
    captioner = _captioner(models, "florence2")
    with captioner:  # loaded once for several calls
        assert captioner.prepare(Image.new("RGB", (300, 100))).size == (64, 64)
        assert len(captioner.caption([Image.new("RGB", (50, 50), c) for c in ("red", "blue")])) == 2
        assert captioner.loaded
    assert not captioner.loaded


@pytest.mark.parametrize("name", ["qwen-vl", "qwen3-vl"])
def test_qwen_prompts_hold_one_image_token_per_merged_patch(models, name):
    captioner = _captioner(models, name, instruction="Name the colour.", max_pixels=100 * 100)
    with captioner:
        tokenizer, image_processor = captioner._processor
        unit = image_processor.patch_size * image_processor.merge_size
        big, wide = captioner.prepare(Image.new("RGB", (1000, 800))), captioner.prepare(Image.new("RGB", (200, 60)))
        for img in (big, wide):
            assert img.width % unit == 0 and img.height % unit == 0 and img.width * img.height <= 100 * 100
        inputs = captioner.model_inputs([big, wide])
        pad = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        for row, grid in zip(inputs["input_ids"], inputs["image_grid_thw"]):
            assert int((row == pad).sum()) == int(grid.prod()) // image_processor.merge_size ** 2
        assert tokenizer.decode(inputs["input_ids"][0]).endswith("Name the colour.<|im_end|>\n<|im_start|>assistant\n")
        lengths = inputs["attention_mask"].sum(dim=1).tolist()
        shorter = lengths.index(min(lengths))
        assert lengths[0] != lengths[1] and inputs["input_ids"][shorter][0] == tokenizer.pad_token_id  # left padding
    with pytest.raises(ValueError, match="instruction is empty"):
        QwenVLCaptioner(models[name], instruction="  ")


def test_joycaption_has_one_bos_and_its_caption_types(models):
    captioner = _captioner(models, "joycaption", length="long")
    assert captioner.prompt == "Write a long detailed description for this image."
    with captioner:
        inputs = captioner.model_inputs([captioner.prepare(Image.new("RGB", (70, 50)))] * 2)
        bos = captioner._processor.tokenizer.bos_token_id
        assert [int((row == bos).sum()) for row in inputs["input_ids"]] == [1, 1]
        image = captioner._processor.tokenizer.convert_tokens_to_ids("<image>")
        assert int((inputs["input_ids"][0] == image).sum()) == 16  # (32 px / 8 px patches)^2
    assert joycaption_prompt("booru_like_tags", 40) == "Write a list of Booru-like tags for this image within 40 words."
    assert _captioner(models, "joycaption", caption_type="booru_tags").kind == "tags"
    with pytest.raises(ValueError, match="not a number of words nor one of"):
        joycaption_prompt("descriptive", "huge")


def _tags(models, colour, **options) -> list[str]:
    tagger = WD14Tagger(models["wd14"], **options)
    return tagger.caption([Image.new("RGB", (64, 64), colour)])[0].text.split(", ")


@pytest.mark.slow
def test_wd14_reads_bgr_0_255_and_applies_thresholds(models):
    red = _tags(models, (230, 20, 20))
    assert "red theme" in red and "blue theme" not in red  # a tagger fed RGB would see blue
    assert "blue theme" in _tags(models, (20, 20, 230))
    assert "general" not in red and "^_^" in red and "no humans" in red  # rating off; kaomoji keeps "_"
    assert red[0] != "demo character" and _tags(models, (20, 230, 20))[0] == "demo character"
    assert "demo character" not in _tags(models, (20, 230, 20), character_threshold=0.99)
    assert _tags(models, (230, 20, 20), include_rating=True)[0] == "general"
    assert "no_humans" in _tags(models, (230, 20, 20), underscores_to_spaces=False)
    assert "no humans" not in _tags(models, (230, 20, 20), exclude=["no_humans"])
    assert _tags(models, (230, 20, 20), general_threshold=1.0) == [""]
    with pytest.raises(ValueError, match="between 0 and 1"):
        WD14Tagger(models["wd14"], general_threshold=35)


def test_models_that_cannot_load_offline_say_what_to_do(tmp_path, models):
    for name in ("florence2", "qwen-vl", "joycaption", "wd14", "blip"):
        with pytest.raises(ModelLoadError) as info:
            make_captioner(f"nobody-here/no-such-{name}-model", _options(), kind=name).load()
        text = str(info.value)
        assert f"'nobody-here/no-such-{name}-model'" in text and "connect to the internet once" in text
        assert "\n" not in text
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model.onnx").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="needs model.onnx and selected_tags.csv"):
        WD14Tagger(tmp_path / "half").load()


def test_detect_captioner(models, tmp_path):
    assert [detect_captioner(str(models[n])) for n in ("florence2", "qwen-vl", "qwen3-vl", "joycaption", "wd14",
                                                      "blip")] == ["florence2", "qwen-vl", "qwen-vl", "joycaption",
                                                                   "wd14", "blip"]
    assert detect_captioner("SmilingWolf/wd-vit-tagger-v3") == "wd14" and detect_captioner("JoyCaption") == "joycaption"
    with pytest.raises(ValueError, match="Cannot tell which captioner"):
        detect_captioner("someone/some-model")
    with pytest.raises(ValueError, match="does not exist"):
        detect_captioner(str(tmp_path / "gone"))


def test_styles_per_family_and_shaping():
    assert [default_style(f) for f in ("sd15", "sdxl", "flux", "qwen_image", "sd3", "z_image", "chroma", "flux2")] \
        == ["short"] * 2 + ["detailed"] * 6
    assert default_style("sdxl", "/models/ponyDiffusionV6XL") == "tags"
    assert shape_caption("The image shows a cat on a mat. It is red.", "short") == "a cat on a mat"
    assert shape_caption("the image shows a cat.\n\nIt is red.", "detailed") == "A cat. It is red."
    assert shape_caption("1girl, smile, 1girl", "detailed", kind="tags") == "1girl, smile"
    assert merge_parts(["A cat on a mat.", "1girl, smile"]) == "A cat on a mat, 1girl, smile"
    assert place_trigger("a cat", "mystyle") == "mystyle, a cat"
    assert place_trigger("a cat, mystyle", "mystyle", "end") == "a cat, mystyle"
    assert place_trigger("mystyle, a cat", "mystyle", "end") == "a cat, mystyle"
    assert place_trigger("a photo of [trigger] on a mat", "mystyle", "start") == "a photo of mystyle on a mat"
    assert place_trigger("a cat", "mystyle", "none") == "a cat"


def test_token_limits_exact_with_the_base_model_and_estimated_without(tiny_sd15):
    long = ", ".join(["a very detailed watercolor painting of a lighthouse"] * 12)
    exact = TokenCounter("sd15", str(tiny_sd15))
    assert exact.tokenizer is not None and exact.check(long).cut and exact.check(long).exact
    assert not exact.check("a cat").cut and exact.check("a cat").label().endswith("/77")
    assert "about" in TokenCounter("sd15").check("a cat").label()
    checks = check_lengths({"a": long, "b": "a cat", "c": ""}, "flux")
    assert set(checks) == {"a", "b"} and not checks["a"].cut  # T5 reads 512
    assert check_lengths({"a": long}, "sdxl")["a"].problem().endswith("CLIP tokens, SDXL reads 77")
    assert check_lengths({"a": long}, "llm") == {}
    # CLIP's real BPE: "a cat" -> 4, "photorealistic" -> 4, "masterpiece, best quality" -> 6 (with start and end)
    assert estimate_tokens("a cat", "clip") == 4 and estimate_tokens("photorealistic", "clip") == 5
    assert 6 <= estimate_tokens("masterpiece, best quality", "clip") <= 7  # errs long, not short
    assert estimate_tokens("a cat", "t5") == 3 and estimate_tokens("a cat", "qwen") == 2


# --------------------------------------------------------------------------------------------- command line
@pytest.mark.parametrize("name", GENERATIVE + ["wd14", "blip"])
@pytest.mark.slow
def test_caption_command_with_each_captioner(models, name, tmp_path, capsys):
    folder = _folder_with_bad_middle(tmp_path)
    write_metadata_csv(folder / "metadata.csv", {"img_003.png": "hand written"})
    args = ["caption", "--input", str(folder), "--model", str(models[name]), "--trigger", "mystyle",
            "--max-tokens", "6", "--device", "cpu", "--family", "sdxl"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "skipped img_002.png" in err and "4 image(s) captioned: 3 new, 1 existing kept" in out
    rows = read_metadata_csv(folder / "metadata.csv")
    assert sorted(rows) == ["img_000.png", "img_001.png", "img_001_wide.png", "img_003.png"]
    assert rows["img_003.png"] == "mystyle, hand written"
    assert all(c.startswith("mystyle, ") and len(c) > len("mystyle, ") for c in rows.values())
    assert main([*args, "--overwrite"]) == 0
    assert read_metadata_csv(folder / "metadata.csv")["img_003.png"] != "mystyle, hand written"


def test_caption_command_sentence_plus_tags_and_style(models, tmp_path, capsys):
    folder = make_demo_images(tmp_path / "imgs", count=2, size=40, with_captions=False)
    assert main(["caption", "--input", str(folder), "--model", str(models["florence2"]), "--tags",
                 str(models["wd14"]), "--family", "flux", "--trigger", "mystyle", "--trigger-placement", "end",
                 "--max-tokens", "6", "--device", "cpu", "--rating"]) == 0
    assert "(style: detailed)" in capsys.readouterr().out
    for caption in read_metadata_csv(folder / "metadata.csv").values():
        assert caption.endswith(", mystyle") and ", general, " in caption and "no humans" in caption


def test_caption_command_offline_hub_model_and_long_captions(models, tmp_path, capsys):
    folder = make_demo_images(tmp_path / "imgs", count=2, size=40, with_captions=False)
    assert main(["caption", "--input", str(folder), "--model", "florence2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: The Florence-2 model 'florence-community/Florence-2-large' could not be loaded")
    assert "connect to the internet once" in err
    long = ", ".join(["a detailed watercolor painting of a lighthouse at dusk"] * 10)
    write_metadata_csv(folder / "metadata.csv", {"img_000.png": long, "img_001.png": "a cat"})
    assert main(["dataset", "check", str(folder), "--min-size", "8", "--family", "sdxl"]) == 0
    out = capsys.readouterr().out
    assert "img_000.png  40×40  caption too long: about" in out and "CLIP tokens, SDXL reads 77" in out
    assert "1 caption(s) are longer than SDXL reads 77 CLIP tokens" in out and "img_001.png" not in out
    assert main(["dataset", "check", str(folder), "--min-size", "8", "--family", "flux"]) == 0
    assert "longer than" not in capsys.readouterr().out


def test_the_captioning_family_follows_the_training_tab(tiny_sdxl, tiny_sd15, tmp_path):
    from lora_studio.models.tiny_llm import build_tiny_llm
    from lora_studio.ui.caption_choice import family_from_training, family_style

    assert family_from_training(str(tiny_sdxl), "auto") == ("sdxl", str(tiny_sdxl))
    assert family_from_training(str(tiny_sd15), "flux") == ("flux", str(tiny_sd15))
    assert family_style("flux") == "detailed" and family_style("sdxl", "/m/illustriousXL") == "tags"
    assert family_from_training(str(build_tiny_llm(tmp_path / "llm")), "auto")[0] is None
