"""FLUX.1 and Chroma LoRAs on the tiny offline pipelines: train, export, reload with every layer placed, resume.

The exported file is loaded the way a user's diffusers script loads it (``load_lora_weights`` on a fresh
``FluxPipeline``) and the layers that really got the adapter are counted: diffusers drops keys it does not
recognise without a word, so "no error" proves nothing. Every module must also be in ComfyUI's FLUX key map.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lora_studio.config import TrainConfig
from lora_studio.training.run_folder import RunFolder
from helpers import run_job, stop_then_resume


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    from lora_studio.models.tiny_flux import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux")


@pytest.fixture(scope="session")
def tiny_chroma(tmp_path_factory) -> Path:
    from lora_studio.models.tiny_flux import build_tiny_chroma

    return build_tiny_chroma(tmp_path_factory.mktemp("models") / "tiny-chroma")


def flux_config(model: Path, data: Path, out: Path, **changes) -> TrainConfig:
    values = dict(base_model=str(model), train_data_dir=str(data), output_dir=str(out), resolution=64, lora_rank=4,
                  learning_rate=1e-2, batch_size=2, max_train_steps=4, save_steps=0, seed=3, max_sequence_length=32)
    values.update(changes)
    return TrainConfig(**values).validate()


def _render(pipe, prompt: str, seed: int = 1) -> np.ndarray:
    from lora_studio.export.verify import render

    return render(pipe, prompt, seed, steps=2, size=64)


@pytest.mark.slow  # about 35 s on 2 cores: a sample at step 4 and the export check on top of training
def test_flux_lora_trains_exports_and_every_layer_is_placed(tiny_flux, demo_images, tmp_path):
    from diffusers import FluxPipeline
    from safetensors import safe_open

    from lora_studio.export.diffusers_format import module_of
    from lora_studio.export.flux_lora import comfy_maps
    from lora_studio.export.verify import count_placed

    job = run_job(flux_config(tiny_flux, demo_images, tmp_path / "out", sample_prompt="a red circle",
                              sample_steps=4))
    assert job.status == "finished", job.error
    assert (job.run.samples_dir / "step_000004.png").is_file()
    log = job.snapshot().log
    passed = [line for line in log if "Export check passed" in line]
    assert passed and "strength 0 vs base 0" in passed[0], log
    assert float(passed[0].split("within ")[1].split(" ")[0]) < 1e-3

    lora = job.run.path / "my_lora.safetensors"
    with safe_open(str(lora), "pt") as fh:
        keys, meta = list(fh.keys()), fh.metadata()
    modules = sorted({module_of(k) for k in keys if not k.endswith(".alpha")})
    assert all(k.startswith("transformer.") for k in keys)
    assert sorted(k[:-len(".alpha")] for k in keys if k.endswith(".alpha")) == modules
    # attention preset: 8 layers in each of the 2 double blocks, q/k/v in each of the 2 single blocks
    assert len(modules) == 2 * 8 + 2 * 3
    assert all(comfy_maps(m.removeprefix("transformer.")) for m in modules)
    assert meta["ss_base_model_version"] == "flux1" and meta["ss_network_dim"] == "4" and meta["sshs_model_hash"]
    assert meta["ss_steps"] == "4" and meta["ss_resolution"] == "(64, 64)"
    assert (job.run.path / "README.md").is_file() and (job.run.path / "my_lora.json").is_file()

    pipe = FluxPipeline.from_pretrained(tiny_flux)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a red circle on a light background"
    base = _render(pipe, prompt)
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="mine")
    assert count_placed(pipe.transformer, "mine") == len(modules)
    pipe.set_adapters(["mine"], adapter_weights=[0.0])
    assert np.array_equal(_render(pipe, prompt), base)  # strength 0 is the base exactly
    pipe.set_adapters(["mine"], adapter_weights=[1.0])
    assert np.abs(_render(pipe, prompt) - base).max() > 1e-3


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_export_check_on_the_training_pipeline_when_a_fresh_one_does_not_fit(precision, tiny_flux, demo_images,
                                                                            tmp_path, monkeypatch):
    from lora_studio.training.flux import FluxTrainer

    monkeypatch.setenv("LORA_STUDIO_CPU_CHECK", "1")  # bf16 on the CPU, as a GPU run holds the real model
    monkeypatch.setattr(FluxTrainer, "fresh_pipeline_fits", lambda self, pipe: False)
    job = run_job(flux_config(tiny_flux, demo_images, tmp_path / "out", max_train_steps=2,
                              mixed_precision=precision))
    assert job.status == "finished", job.error
    log = job.snapshot().log
    assert any("on the training pipeline" in line for line in log)
    passed = [line for line in log if "Export check passed" in line]
    assert passed and "strength 0 vs base 0" in passed[0]
    assert float(passed[0].split("within ")[1].split(" ")[0]) < 1e-3


@pytest.mark.slow
def test_chroma_lora_trains_and_reloads_into_a_fresh_pipeline(tiny_chroma, demo_images, tmp_path):
    from safetensors import safe_open

    job = run_job(flux_config(tiny_chroma, demo_images, tmp_path / "out", lora_targets="all_linear",
                              train_single_block_indices="1", max_train_steps=2))
    assert job.status == "finished", job.error
    assert any("Export check passed" in line for line in job.snapshot().log)
    with safe_open(str(job.run.path / "my_lora.safetensors"), "pt") as fh:
        keys, meta = list(fh.keys()), fh.metadata()
    assert meta["ss_base_model_version"] == "chroma"
    assert any(".ff_context.net.2." in k for k in keys) and any("single_transformer_blocks.1.proj_mlp" in k for k in keys)
    assert not any("single_transformer_blocks.0." in k for k in keys)


@pytest.mark.slow
def test_flux_resume_after_stop_gives_the_same_losses(tiny_flux, demo_images, tmp_path):
    steps = 6
    full = run_job(flux_config(tiny_flux, demo_images, tmp_path / "a", max_train_steps=steps, save_steps=2,
                               verify_export=False, timestep_sampling="flux_shift", loss_weighting="cosmap"))
    assert full.status == "finished", full.error
    full_losses = [loss for _, loss in full.snapshot().losses]

    cfg = flux_config(tiny_flux, demo_images, tmp_path / "b", max_train_steps=steps, save_steps=2,
                      verify_export=False, timestep_sampling="flux_shift", loss_weighting="cosmap")
    resumed = stop_then_resume(cfg, stop_at=3)
    metrics = RunFolder(resumed.run.path).read_metrics()
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert [m["loss"] for m in metrics] == pytest.approx(full_losses, rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_init_lora_continues_from_an_exported_file(tiny_flux, demo_images, tmp_path):
    from lora_studio.export.flux_lora import read_flux_lora
    from lora_studio.training.flux import FluxTrainer
    from lora_studio.training.events import EventBus

    first = run_job(flux_config(tiny_flux, demo_images, tmp_path / "a", max_train_steps=2, verify_export=False))
    assert first.status == "finished", first.error
    lora = first.run.path / "my_lora.safetensors"
    saved, _ = read_flux_lora(lora)
    cfg = flux_config(tiny_flux, demo_images, tmp_path / "b", init_lora=str(lora), lora_alpha=2.0)
    trainer = FluxTrainer(cfg, RunFolder.create(cfg), EventBus(), family="flux")
    trainer.prepare()
    state = trainer.peft_state()
    key = next(k for k in saved if k.endswith("lora_B.weight"))
    # alpha 4 in the file, 2 now: lora_B doubles so the LoRA keeps exactly its effect
    assert torch.allclose(state[key], saved[key].float() * 2, atol=1e-3)


def test_misspelt_flux_key_and_a_folder_without_images_get_their_messages(tiny_flux, tmp_path):
    from lora_studio.config import load_config
    from lora_studio.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(overrides={"timestep_sampler": "shift"})
    assert "Did you mean 'timestep_sampling'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(overrides={"train_double_block_indices": "0-x"})
    assert "0-x" in str(err.value) and "0-7,10" in str(err.value)
    (tmp_path / "empty").mkdir()
    job = run_job(flux_config(tiny_flux, tmp_path / "empty", tmp_path / "out"))
    assert job.status == "failed" and "No images found" in job.error
