"""The SD1.5 trainer end to end on the tiny model: learning, export, resume, failures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_studio.config import TrainConfig
from lora_studio.training.events import Progress
from lora_studio.training.job import TrainingJob
from lora_studio.training.run_folder import RunFolder
from helpers import run_job

ROOT = Path(__file__).resolve().parent.parent


def make_config(tiny_sd15: Path, data: Path, out: Path, **kw) -> TrainConfig:
    values = dict(base_model=str(tiny_sd15), train_data_dir=str(data), output_dir=str(out), resolution=64,
                  lora_rank=4, learning_rate=1e-3, batch_size=2, max_train_steps=6, save_steps=0,
                  mixed_precision="no", seed=123)
    values.update(kw)
    return TrainConfig(**values).validate()



@torch.no_grad()
def denoise_error(base: Path, lora: Path | None, data: Path, strength: float = 1.0) -> float:
    """Mean noise-prediction error on the training images with fixed noise and timesteps."""
    from diffusers import StableDiffusionPipeline

    from lora_studio.data.captions import load_captions
    from lora_studio.data.images import list_images
    from lora_studio.training.latent_cache import image_tensor
    from lora_studio.data.train_set import TrainItem

    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="x")
        pipe.set_adapters(["x"], adapter_weights=[strength])
    images = list_images(data)
    captions = load_captions(data, images)
    gen = torch.Generator().manual_seed(0)
    total = 0.0
    for path in images:
        px, _ = image_tensor(TrainItem(path, captions[path], (64, 64), (64, 64)))
        latents = pipe.vae.encode(px[None]).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer([captions[path]], padding="max_length", max_length=77, return_tensors="pt").input_ids
        cond = pipe.text_encoder(ids)[0]
        for _ in range(8):
            noise = torch.randn(latents.shape, generator=gen)
            t = torch.randint(0, 1000, (1,), generator=gen)
            noisy = pipe.scheduler.add_noise(latents, noise, t)
            pred = pipe.unet(noisy, t, encoder_hidden_states=cond).sample
            total += float(torch.nn.functional.mse_loss(pred, noise))
    return total / (len(images) * 8)


@pytest.mark.slow
def test_loss_goes_down_and_exports_reload(tiny_sd15, demo_images, tmp_path):
    cfg = make_config(tiny_sd15, demo_images, tmp_path / "out", max_train_steps=40, learning_rate=3e-3,
                      lora_rank=8, lora_alpha=4)  # alpha != rank: the export check covers the scale
    job = run_job(cfg)
    assert job.status == "finished", job.error
    run = job.run
    kohya = run.path / "my_lora.safetensors"
    assert kohya.is_file() and (run.path / "diffusers").is_dir()
    assert any("Export check passed" in line for line in job.snapshot().log)
    metrics = run.read_metrics()
    assert [m["step"] for m in metrics] == list(range(1, 41))
    assert all({"step", "loss", "lr"} <= set(m) for m in metrics)
    assert list(run.logs_dir.iterdir()), "TensorBoard event files are written"
    base_err = denoise_error(tiny_sd15, None, demo_images)
    lora_err = denoise_error(tiny_sd15, kohya, demo_images)
    zero_err = denoise_error(tiny_sd15, kohya, demo_images, strength=0.0)
    assert lora_err < base_err * 0.97, (base_err, lora_err)
    assert zero_err == pytest.approx(base_err, rel=1e-6)
    state = run.read_state()
    assert state["status"] == "finished" and str(kohya) in state["files"]


@pytest.mark.slow
def test_resume_after_stop_gives_the_same_losses(tiny_sd15, demo_images, tmp_path):
    steps = 8
    full = run_job(make_config(tiny_sd15, demo_images, tmp_path / "a", max_train_steps=steps, save_steps=3,
                               verify_export=False, lora_dropout=0.1))
    assert full.status == "finished", full.error
    full_losses = [loss for _, loss in full.snapshot().losses]

    cfg = make_config(tiny_sd15, demo_images, tmp_path / "b", max_train_steps=steps, save_steps=3,
                      verify_export=False, lora_dropout=0.1)
    first = TrainingJob(cfg)
    first.bus.subscribe(lambda e: first.stop() if isinstance(e, Progress) and e.step == 5 else None)
    first.start().wait(600)
    assert first.status == "stopped", first.error
    run = first.run
    assert [s for s, _ in run.list_checkpoints()] == [3, 5]  # periodic + the one saved on stop
    assert run.read_state()["status"] == "stopped"

    resumed = TrainingJob.resume(run.path)
    resumed.start().wait(600)
    assert resumed.status == "finished", resumed.error
    metrics = RunFolder(run.path).read_metrics()
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert [m["loss"] for m in metrics] == pytest.approx(full_losses, rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_checkpoints_are_kohya_files_and_pruned(tiny_sd15, demo_images, tmp_path):
    from safetensors import safe_open

    job = run_job(make_config(tiny_sd15, demo_images, tmp_path / "out", max_train_steps=8, save_steps=2,
                              keep_checkpoints=2, verify_export=False))
    assert job.status == "finished", job.error
    ckpts = job.run.list_checkpoints()
    assert [s for s, _ in ckpts] == [4, 6]  # keep_checkpoints=2; the end writes the final file instead
    lora = next(ckpts[-1][1].glob("*.safetensors"))
    with safe_open(str(lora), "pt") as fh:
        keys = list(fh.keys())
        assert fh.metadata()["ss_steps"] == "6"
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith(".alpha") for k in keys)


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_sd15, demo_images, tmp_path, monkeypatch):
    from lora_studio.training.diffusion import DiffusionTrainer

    original = DiffusionTrainer.compute_loss
    calls = {"n": 0}

    def poisoned(self, batch):
        calls["n"] += 1
        loss = original(self, batch)
        return loss * float("nan") if calls["n"] >= 5 else loss

    monkeypatch.setattr(DiffusionTrainer, "compute_loss", poisoned)
    job = run_job(make_config(tiny_sd15, demo_images, tmp_path / "out", max_train_steps=10, save_steps=2))
    assert job.status == "failed"
    assert "NaN" in job.error and "step 5" in job.error and "step_000004" in job.error
    assert [s for s, _ in job.run.list_checkpoints()] == [2, 4]
    assert job.run.read_state()["status"] == "failed"


@pytest.mark.slow
def test_init_lora_continues_from_an_exported_file(tiny_sd15, demo_images, tmp_path):
    first = run_job(make_config(tiny_sd15, demo_images, tmp_path / "a", max_train_steps=4, verify_export=False))
    lora = first.run.path / "my_lora.safetensors"
    second = run_job(make_config(tiny_sd15, demo_images, tmp_path / "b", max_train_steps=2, init_lora=str(lora)))
    assert second.status == "finished", second.error
    assert any("Continuing from the LoRA" in line for line in second.snapshot().log)


@pytest.mark.parametrize("setup, words", [
    ("missing", "does not exist"),
    ("empty", "No images found"),
    ("uncaptioned", "has a caption"),
])
def test_bad_datasets_refuse_to_start(tiny_sd15, tmp_path, setup, words):
    from lora_studio.models.tiny import make_demo_images

    data = tmp_path / "data"
    if setup == "empty":
        data.mkdir()
    elif setup == "uncaptioned":
        make_demo_images(data, count=3, with_captions=False)
    job = run_job(make_config(tiny_sd15, data, tmp_path / "out"))
    assert job.status == "failed"
    assert words in job.error


@pytest.mark.slow
def test_second_job_is_refused_while_one_runs(tiny_sd15, demo_images, tmp_path):
    from lora_studio.errors import TrainingError

    first = TrainingJob(make_config(tiny_sd15, demo_images, tmp_path / "a", max_train_steps=200,
                                    verify_export=False)).start()
    try:
        with pytest.raises(TrainingError, match="already in progress"):
            TrainingJob(make_config(tiny_sd15, demo_images, tmp_path / "b")).start()
    finally:
        first.stop()
        first.wait(600)
    assert first.status == "stopped"


@pytest.mark.slow
def test_cli_train_and_bad_config(tiny_sd15, demo_images, tmp_path):
    cfg = tmp_path / "my_style.yaml"
    cfg.write_text(f"base_model: {tiny_sd15}\ntrain_data_dir: {demo_images}\noutput_dir: {tmp_path / 'out'}\n"
                   "resolution: 64\nlora_rank: 4\nsave_steps: 0\nmixed_precision: 'no'\n", encoding="utf-8")
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    ok = subprocess.run([sys.executable, "-m", "lora_studio", "train", "--config", str(cfg), "max_train_steps=3",
                         "output_name=cli_lora"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "3/3" in ok.stderr and "cli_lora.safetensors" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "lora_studio", "train", "--config", str(cfg), "batch_sise=2"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert bad.returncode == 2
    assert "batch_sise" in bad.stderr and "batch_size" in bad.stderr and "Traceback" not in bad.stderr
    state = json.loads(next((tmp_path / "out").glob("cli_lora-*/job.json")).read_text())
    assert state["status"] == "finished"


@pytest.mark.slow
def test_v_prediction_text_encoder_and_all_knobs(tmp_path, demo_images):
    """SD2-style v-prediction model, text-encoder LoRA with its own lr, accumulation, min-SNR, noise offset,
    disk latent cache: the run finishes and its kohya file (UNet + lora_te_ keys) passes the reload check."""
    from safetensors import safe_open

    from lora_studio.models.tiny import build_tiny_sd15

    model = build_tiny_sd15(tmp_path / "vpred", prediction_type="v_prediction")
    cfg = make_config(model, demo_images, tmp_path / "out", max_train_steps=4, train_text_encoder=True,
                      text_encoder_lr=5e-4, gradient_accumulation_steps=2, min_snr_gamma=5.0, noise_offset=0.05,
                      cache_latents="disk", lr_scheduler="constant_with_warmup", lr_warmup_steps=1)
    job = run_job(cfg)
    assert job.status == "finished", job.error
    log = "\n".join(job.snapshot().log)
    assert "(sd2), prediction type v_prediction" in log and "Export check passed" in log
    assert "effective batch 4" in log
    with safe_open(str(job.run.path / "my_lora.safetensors"), "pt") as fh:
        keys = list(fh.keys())
        meta = fh.metadata()
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)
    assert meta["ss_base_model_version"] == "sd_v2" and meta["ss_v2"] == "True"
    assert meta["ss_v_parameterization"] == "True"
    assert list((tmp_path / "out" / ".cache" / "latents").glob("*.pt")), "disk cache written"
    lrs = [m["lr"] for m in job.run.read_metrics()]
    assert lrs[0] < lrs[-1] == pytest.approx(1e-3)  # warm-up, then constant
