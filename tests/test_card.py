"""The LoRA card (README.md), the A1111 sidecar and the offline message of push_to_hub."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from lora_studio.config import TrainConfig
from lora_studio.data.tags import tag_frequency
from lora_studio.errors import StudioError
from lora_studio.export.card import trigger_words, write_card
from lora_studio.export.hub import push_to_hub

A1111_KEYS = {"description", "sd version", "activation text", "preferred weight", "negative text", "notes"}
CAPTIONS = {"imgs/a.png": "zxstyle, red circle, watercolor", "imgs/b.png": "zxstyle, blue square, watercolor",
            "imgs/c.png": "zxstyle, green | circle"}


def _run(tmp_path: Path, name: str = "my_style") -> tuple[Path, list[Path]]:
    run = tmp_path / "run"
    (run / "diffusers").mkdir(parents=True)
    lora = run / f"{name}.safetensors"
    lora.write_bytes(b"")
    (run / "job.json").write_text(json.dumps({"status": "finished", "step": 300, "num_processes": 2,
                                              "effective_batch": 4}), encoding="utf-8")
    return run, [lora, run / "diffusers"]


def _config(**kw) -> TrainConfig:
    values = dict(base_model="runwayml/stable-diffusion-v1-5", train_data_dir="imgs", output_name="my_style",
                  lora_rank=8, lora_alpha=4, batch_size=2)
    values.update(kw)
    return TrainConfig(**values).validate()


def test_sd15_card_and_sidecar(tmp_path):
    run, files = _run(tmp_path)
    freq = tag_frequency(CAPTIONS, "imgs")
    written = write_card(run, _config(), "sd15", files, freq, captions=list(CAPTIONS.values()), steps=300,
                         num_images=3)
    assert [p.name for p in written] == ["README.md", "my_style.json"]
    text = (run / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n") and "base_model: runwayml/stable-diffusion-v1-5" in text
    assert 'instance_prompt: "zxstyle"' in text
    for needle in ("`zxstyle`", "<lora:my_style:0.8>", "LoraLoader", "models/Lora", "ComfyUI/models/loras",
                   'pipe.load_lora_weights(".", weight_name="my_style.safetensors", adapter_name="my_style")',
                   "StableDiffusionPipeline", "| watercolor | 2 |", "green \\| circle", "| LoRA rank / alpha | 8 / 4 |",
                   "2 x 1 x 2 = 4", "| steps | 300 |", "| training images | 3 |", "`diffusers/`"):
        assert needle in text, needle
    sidecar = json.loads((run / "my_style.json").read_text(encoding="utf-8"))
    assert set(sidecar) == A1111_KEYS
    assert sidecar["sd version"] == "SD1" and sidecar["activation text"] == "zxstyle"
    assert sidecar["preferred weight"] == 0.8 and "300 steps" in sidecar["description"]
    assert json.loads((run / "job.json").read_text())["status"] == "finished"  # the run state is untouched


def test_grid_becomes_the_a1111_preview(tmp_path):
    run, files = _run(tmp_path)
    grid = tmp_path / "grid.png"
    Image.new("RGB", (8, 8), "red").save(grid)
    written = write_card(run, _config(), "sdxl", files, {}, grid_image=grid)
    assert run / "my_style.preview.png" in written
    text = (run / "README.md").read_text(encoding="utf-8")
    assert "![Strength grid" in text and "(my_style.preview.png)" in text and "StableDiffusionXLPipeline" in text
    assert json.loads((run / "my_style.json").read_text())["sd version"] == "SDXL"
    write_card(run, _config(), "sdxl", files, {})  # a later rewrite keeps showing the grid
    assert "(my_style.preview.png)" in (run / "README.md").read_text(encoding="utf-8")


def test_local_base_model_and_no_trigger(tmp_path):
    run, files = _run(tmp_path)
    cfg = _config(base_model=str(tmp_path))  # a local folder is no Hub id: no base_model in the header
    write_card(run, cfg, "sd15", files, {}, captions=["a cat", "a dog", "a bird"])
    text = (run / "README.md").read_text(encoding="utf-8")
    assert "base_model:" not in text.split("---")[1] and "instance_prompt" not in text
    assert "None: the captions have no common first tag" in text
    assert json.loads((run / "my_style.json").read_text())["activation text"] == ""


def test_llm_card_has_no_sidecar(tmp_path):
    run = tmp_path / "run"
    (run / "tiny").mkdir(parents=True)
    written = write_card(run, _config(output_name="tiny", base_model="org/tiny-llama"), "llm", [run / "tiny"], {})
    assert [p.name for p in written] == ["README.md"]
    text = (run / "README.md").read_text(encoding="utf-8")
    assert "PeftModel.from_pretrained(model, \"tiny\")" in text and "library_name: peft" in text
    assert "ADAPTER" in text and "<lora:" not in text


def test_trigger_words():
    assert trigger_words(SimpleNamespace(trigger_word="ohwx"), ["x, y"]) == ["ohwx"]
    assert trigger_words(SimpleNamespace(), ["sks, a", "sks, b", "c, d"]) == ["sks"]
    assert trigger_words(SimpleNamespace(), ["a", "b", "c"]) == []
    assert trigger_words(SimpleNamespace(), []) == []


def test_push_to_hub_offline_makes_no_request(tmp_path, monkeypatch):
    import huggingface_hub

    run, files = _run(tmp_path)
    write_card(run, _config(), "sd15", files, {})

    def no_network(*args, **kwargs):
        raise AssertionError("push_to_hub tried the network in offline mode")

    monkeypatch.setattr(huggingface_hub.HfApi, "__init__", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    with pytest.raises(StudioError, match="offline mode is on"):
        push_to_hub(run, "me/my_style")
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(StudioError, match="HF_TOKEN"):
        push_to_hub(run, "me/my_style")
    with pytest.raises(StudioError, match="user/name"):
        push_to_hub(run, "", token="hf_dummy")
    with pytest.raises(StudioError, match="README.md"):
        push_to_hub(tmp_path, "me/x", token="hf_dummy")
