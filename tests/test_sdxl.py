"""The SDXL trainer on the tiny SDXL model: trains, exports kohya (SAI names), reloads to the same outputs."""

from __future__ import annotations

import pytest

from pathlib import Path

import numpy as np
import torch

from lora_studio.config import TrainConfig
from helpers import run_job


def make_config(model: Path, data: Path, out: Path, **kw) -> TrainConfig:
    values = dict(base_model=str(model), train_data_dir=str(data), output_dir=str(out), resolution=64,
                  lora_rank=4, lora_alpha=2, learning_rate=3e-3, batch_size=2, max_train_steps=6, save_steps=0,
                  mixed_precision="no", seed=7)
    values.update(kw)
    return TrainConfig(**values).validate()



def _render(pipe, prompt: str, seed: int = 3) -> np.ndarray:
    from lora_studio.export.verify import render

    return render(pipe, prompt, seed, steps=2, size=64)


@pytest.mark.slow
def test_sdxl_trains_exports_and_reloads(tiny_sdxl, demo_images, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    job = run_job(make_config(tiny_sdxl, demo_images, tmp_path / "out"))
    assert job.status == "finished", job.error
    log = job.snapshot().log
    assert any("Export check passed" in line for line in log), log
    assert any("(sdxl)" in line for line in log)
    kohya = job.run.path / "my_lora.safetensors"
    with safe_open(str(kohya), framework="pt") as fh:
        keys, meta = list(fh.keys()), fh.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys)  # frozen text encoders: UNet only
    assert any(k.startswith(("lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_unet_middle_block_"))
               for k in keys)
    assert not any("down_blocks" in k or "up_blocks" in k for k in keys)  # SAI names, not diffusers names
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"

    # A fresh StableDiffusionXLPipeline with the file: strength 0 is the base exactly, strength 1 differs.
    prompt = "a red circle on a light background"
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.set_progress_bar_config(disable=True)
    base = _render(pipe, prompt)
    pipe.load_lora_weights(str(kohya.parent), weight_name=kohya.name, adapter_name="x")
    pipe.set_adapters(["x"], adapter_weights=[0.0])
    assert np.array_equal(_render(pipe, prompt), base)
    pipe.set_adapters(["x"], adapter_weights=[1.0])
    assert np.abs(_render(pipe, prompt) - base).max() > 1e-4


@pytest.mark.slow
def test_sdxl_text_encoder_lora_exports_te1_and_te2(tiny_sdxl, demo_images, tmp_path, monkeypatch):
    """Also the export check's CPU path (taken on GPUs without room for two fp32 SDXL pipelines)."""
    from safetensors import safe_open

    from lora_studio.training.sdxl import SDXLTrainer

    monkeypatch.setattr(SDXLTrainer, "_verify_on_cpu", lambda self: True)
    job = run_job(make_config(tiny_sdxl, demo_images, tmp_path / "out", train_text_encoder=True,
                              gradient_checkpointing=True, max_train_steps=4))
    assert job.status == "finished", job.error
    log = job.snapshot().log
    assert any("Checking the export on the CPU" in line for line in log)
    assert any("Export check passed" in line for line in log)
    with safe_open(str(job.run.path / "my_lora.safetensors"), framework="pt") as fh:
        keys = list(fh.keys())
    assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in keys)


@pytest.mark.slow
def test_sdxl_conditioning_matches_the_pipeline(tiny_sdxl, demo_images, tmp_path):
    """Cached text conditioning and time ids are what StableDiffusionXLPipeline feeds the UNet."""
    from lora_studio.training.events import EventBus
    from lora_studio.training.run_folder import RunFolder
    from lora_studio.training.sdxl import SDXLTrainer

    cfg = make_config(tiny_sdxl, demo_images, tmp_path / "out")
    trainer = SDXLTrainer(cfg, RunFolder.create(cfg), EventBus())
    trainer.prepare()
    pipe = trainer.pipe
    captions = [trainer.items[0].caption, trainer.items[1].caption]
    cond = trainer.text_conditioning(captions)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, device="cpu")
    assert cond["encoder_hidden_states"].shape == (2, 77, 64)
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds)
    torch.testing.assert_close(cond["text_embeds"], pooled)
    # time ids: original (h, w), crop (top, left), target (h, w) -- for a 64 px square image at 64 px
    ids = trainer.time_ids(trainer.items[:2], trainer.latents.crops([0, 1]))
    assert ids.tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2
    assert pipe.vae.dtype == torch.float32
    assert all(p.device.type == "cpu" for p in pipe.text_encoder_2.parameters())
    for name in ("text_encoder", "text_encoder_2"):  # frozen by default
        assert not any(p.requires_grad for p in getattr(pipe, name).parameters())
    assert len(trainer.models()) == 1 and len(trainer.param_groups()) == 1
    trainer.cleanup()


@pytest.mark.slow
def test_time_ids_use_original_size_crop_and_bucket(tiny_sdxl, tmp_path):
    """A wide image: original size from the file, crop offset from the latent cache, target = bucket."""
    from PIL import Image

    from lora_studio.training.events import EventBus
    from lora_studio.training.run_folder import RunFolder
    from lora_studio.training.sdxl import SDXLTrainer

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (200, 90), (200, 30, 30)).save(data / "wide.png")
    (data / "wide.txt").write_text("a wide red image", encoding="utf-8")
    cfg = make_config(tiny_sdxl, data, tmp_path / "out", enable_bucket=False, batch_size=1)
    trainer = SDXLTrainer(cfg, RunFolder.create(cfg), EventBus())
    trainer.prepare()
    (top, left), = trainer.latents.crops([0])
    assert top == 0 and left > 0  # scaled to cover 64x64, then center-cropped sideways
    assert trainer.time_ids(trainer.items[:1], [(top, left)]).tolist() == [[90.0, 200.0, 0.0, float(left), 64.0, 64.0]]
    trainer.cleanup()


@pytest.mark.slow
def test_nan_latents_stop_the_run_naming_the_vae_key(tiny_sdxl, demo_images, tmp_path):
    from diffusers import AutoencoderKL

    broken = tmp_path / "broken-vae"
    vae = AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae")
    with torch.no_grad():
        vae.encoder.conv_out.weight.fill_(float("nan"))
    vae.save_pretrained(broken)
    job = run_job(make_config(tiny_sdxl, demo_images, tmp_path / "out", vae=str(broken)))
    assert job.status == "failed"
    assert "NaN" in job.error and "vae key" in job.error and "fp16" in job.error


def test_sdxl_defaults_to_1024_and_fp32_vae(tiny_sdxl, tmp_path):
    from lora_studio.training.events import EventBus
    from lora_studio.training.run_folder import RunFolder
    from lora_studio.training.sdxl import SDXLTrainer

    cfg = TrainConfig(base_model=str(tiny_sdxl), train_data_dir=str(tmp_path), output_dir=str(tmp_path / "o"),
                      mixed_precision="no").validate()
    trainer = SDXLTrainer(cfg, RunFolder.create(cfg), EventBus())
    assert trainer.resolution == 1024 and trainer.family == "sdxl"

    class _Vae:
        class config:
            force_upcast = True

    class _SafeVae:
        class config:
            force_upcast = False

    trainer.pipe = type("P", (), {"vae": _Vae()})()
    assert trainer.vae_dtype(torch.float16) == torch.float32  # the SDXL VAE overflows in fp16
    trainer.pipe.vae = _SafeVae()
    assert trainer.vae_dtype(torch.float16) == torch.float32  # fp16-safe only when chosen with the vae key
    trainer.config = cfg.replace(vae="some/fp16-fix")
    assert trainer.vae_dtype(torch.float16) == torch.float16
    assert trainer.vae_dtype(torch.float32) == torch.float32


@pytest.mark.slow
def test_a_sample_that_runs_out_of_memory_is_skipped_not_the_run(tiny_sdxl, demo_images, tmp_path, monkeypatch):
    from lora_studio.training.diffusion import DiffusionTrainer

    def render_sample(self, step):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(DiffusionTrainer, "render_sample", render_sample)
    job = run_job(make_config(tiny_sdxl, demo_images, tmp_path / "out", max_train_steps=2, sample_steps=1,
                              sample_prompt="a red circle", verify_export=False))
    assert job.status == "finished", job.error
    assert any("Sample at step 1 skipped" in line for line in job.snapshot().log)
