"""The miniature build scripts still run: every stage of every family, with a few steps each.

The committed weights come from the same scripts at full length (``build.json`` in each folder says how);
these runs check the code path, not the quality (which ``test_miniature_models.py`` checks on the weights).
"""

from __future__ import annotations

import json

import pytest
import torch

from lora_studio.miniature.build import build

SCALE = 0.002


def test_sd15_build_runs_and_records_its_recipe(tmp_path):
    record = build("sd15", tmp_path / "sd15", scale=SCALE, threads=1)
    assert record["recipe"]["unet_steps"] == 5 and record["recipe"]["seed"] == 1300
    saved = json.loads((tmp_path / "sd15" / "build.json").read_text())
    assert saved["measured"]["vae"]["pixel_mae"] >= 0 and 0 <= saved["measured"]["colour_accuracy"] <= 1
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "sd15")
    assert pipe.text_encoder.dtype == torch.float32, "the text encoder stays fp32 (DESIGN.md)"
    for family in ("sd15_v", "sdxl"):  # both start from an sd15 miniature
        record = build(family, tmp_path / family, scale=SCALE, base=tmp_path / "sd15", threads=1)
        assert record["family"] == family
    scheduler = StableDiffusionPipeline.from_pretrained(tmp_path / "sd15_v").scheduler
    assert scheduler.config.prediction_type == "v_prediction"


@pytest.mark.parametrize("family", ["llm", "blip"])
def test_llm_and_captioner_builds_run(family, tmp_path):
    record = build(family, tmp_path / family, scale=SCALE, threads=1)
    assert record["recipe"]["steps"] == max(2, int({"llm": 1200, "blip": 4000}[family] * SCALE))
    assert (tmp_path / family / "config.json").is_file()
