"""A1111-style single-file checkpoints as base model (what creators download from model sites), offline.

``save_as_single_file`` writes the tiny SD1.5 pipeline with the original (LDM) weight names; diffusers'
``from_single_file`` reads it, taking configs and tokenizer from ``single_file_config`` instead of the hub.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_studio.config import TrainConfig
from lora_studio.errors import ModelLoadError
from lora_studio.models.detect import detect_family
from lora_studio.models.loading import load_diffusion_pipeline
from lora_studio.models.tiny import save_as_single_file
from helpers import run_job


@pytest.fixture(scope="module")
def checkpoint(tiny_sd15, tmp_path_factory):
    return save_as_single_file(tiny_sd15, tmp_path_factory.mktemp("civitai") / "my_finetune.safetensors")


def test_the_single_file_loads_to_the_same_model(tiny_sd15, checkpoint):
    from safetensors import safe_open

    with safe_open(str(checkpoint), framework="pt") as fh:
        keys = set(fh.keys())
    assert {"model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight",
            "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"} <= keys
    assert detect_family(str(checkpoint)) == "sd15"
    folder = load_diffusion_pipeline(str(tiny_sd15), "sd15")
    single = load_diffusion_pipeline(str(checkpoint), "sd15", single_file_config=str(tiny_sd15))
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(folder, name).state_dict(), getattr(single, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_without_its_configs_offline_the_message_says_what_to_set(checkpoint, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))  # nothing cached either
    with pytest.raises(ModelLoadError) as err:
        load_diffusion_pipeline(str(checkpoint), "sd15")
    message = str(err.value)
    assert "my_finetune.safetensors" in message and "single_file_config" in message and "\n" not in message


@pytest.mark.slow
def test_a_lora_trains_on_a_single_file_and_renders_on_it(tiny_sd15, checkpoint, demo_images, tmp_path):
    from lora_studio.inference.grid import PipelineCache, RenderSettings, render_grid
    from lora_studio.ui.test_tab import model_options

    cfg = TrainConfig(base_model=str(checkpoint), single_file_config=str(tiny_sd15), train_data_dir=str(demo_images),
                      output_dir=str(tmp_path / "out"), resolution=64, lora_rank=4, learning_rate=3e-3,
                      batch_size=2, max_train_steps=6, save_steps=0, mixed_precision="no", seed=11).validate()
    job = run_job(cfg)
    assert job.status == "finished", job.error
    log = job.snapshot().log
    assert any("(sd15)" in line for line in log)
    assert any("Export check passed" in line for line in log), log  # reloaded into a fresh single-file pipeline
    lora = job.run.path / "my_lora.safetensors"

    # The Testing tab loads the base as the run did; strength 0 is the diffusers folder's base image.
    options = model_options(str(lora), str(checkpoint))
    assert options == {"vae": None, "single_file_config": str(tiny_sd15)}
    settings = RenderSettings(prompt="a red circle", seed=3, steps=2, cfg=5.0, width=64, height=64)
    on_file = render_grid(str(checkpoint), [("lora", lora)], settings, [0.0, 1.0], cache=PipelineCache(),
                          out_path=tmp_path / "file.png", **options)
    on_folder = render_grid(str(tiny_sd15), [("lora", lora)], settings, [0.0, 1.0], cache=PipelineCache(),
                            out_path=tmp_path / "folder.png")
    (base_file, lora_file), (base_folder, lora_folder) = on_file.cells[0], on_folder.cells[0]
    assert np.array_equal(np.asarray(base_file), np.asarray(base_folder))
    assert np.array_equal(np.asarray(lora_file), np.asarray(lora_folder))
    assert not np.array_equal(np.asarray(lora_file), np.asarray(base_file))


def test_the_training_tab_says_where_a_single_files_configs_come_from(tiny_sd15, checkpoint):
    from lora_studio.ui.train_family import family_choices

    text = family_choices(str(checkpoint), "auto", None).text
    assert "Stable Diffusion 1.x" in text and "single_file_config" in text
    assert "single_file_config" not in family_choices(str(tiny_sd15), "auto", None).text
