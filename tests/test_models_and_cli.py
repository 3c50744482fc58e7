"""Base-model detection and its messages, and the presets/doctor commands."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_studio.errors import ModelLoadError
from lora_studio.models.detect import detect_family, resolve_family
from lora_studio.models.loading import load_diffusion_pipeline

ROOT = Path(__file__).resolve().parent.parent


def test_detects_sd15_folder(tiny_sd15):
    assert detect_family(str(tiny_sd15)) == "sd15"
    assert resolve_family("auto", str(tiny_sd15)) == "sd15"


@pytest.mark.parametrize("name, words", [
    ("does/not/exist/model", "was not found"),
    ("./missing_model_folder", "was not found"),
    ("", "No base model given"),
])
def test_missing_models_give_one_sentence(name, words):
    with pytest.raises(ModelLoadError, match=words):
        detect_family(name)


def test_hub_id_without_network_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        detect_family("nobody-here/not-a-cached-model")
    assert "Could not reach the model hub" in str(err.value) and "local cache" in str(err.value)


def test_lora_file_as_base_model_is_explained(tmp_path):
    import torch
    from safetensors.torch import save_file

    lora = tmp_path / "style.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 4)}, str(lora))
    with pytest.raises(ModelLoadError, match="is a LoRA file, not a base model"):
        detect_family(str(lora))


def test_wrong_family_in_config_is_named(tiny_sd15):
    with pytest.raises(ModelLoadError) as err:
        resolve_family("llm", str(tiny_sd15))
    assert "Stable Diffusion 1.x" in str(err.value) and "model_family" in str(err.value)


def test_folder_that_is_no_model(tmp_path):
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="neither a diffusers model folder"):
        detect_family(str(tmp_path))


def test_broken_model_folder_is_one_sentence(tiny_sd15, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd15, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(ModelLoadError) as err:
        load_diffusion_pipeline(str(broken), "sd15")
    assert str(err.value).startswith("Could not load the Stable Diffusion 1.x model")
    assert "\n" not in str(err.value)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lora_studio", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=600)


@pytest.mark.slow
def test_presets_command_lists_what_each_sets():
    out = _cli("presets")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("GPU: ")
    for name in ("12gb", "16gb", "24gb"):
        assert name in out.stdout
    assert "batch_size=" in out.stdout and "gradient_checkpointing=" in out.stdout


@pytest.mark.slow
def test_doctor_trains_a_tiny_model():
    out = _cli("doctor", "--steps", "3")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "CUDA available: " in out.stdout
    assert "tiny training OK" in out.stdout and "All checks passed." in out.stdout


@pytest.mark.slow
def test_preset_auto_without_gpu_applies_none(tiny_sd15, demo_images, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"base_model: {tiny_sd15}\ntrain_data_dir: {demo_images}\noutput_dir: {tmp_path / 'out'}\n"
                   "resolution: 64\nlora_rank: 4\nsave_steps: 0\nverify_export: false\n", encoding="utf-8")
    out = _cli("train", "--config", str(cfg), "--preset", "auto", "max_train_steps=2")
    assert out.returncode == 0, out.stderr[-2000:]
    import torch

    if not torch.cuda.is_available():
        assert "no CUDA GPU detected, so no preset is applied" in out.stderr
    assert "2/2" in out.stderr


def test_single_file_checkpoint_that_cannot_load_is_one_sentence(tmp_path):
    """An A1111-style file goes through from_single_file; one that cannot load gives one sentence."""
    import torch
    from safetensors.torch import save_file

    ckpt = tmp_path / "half_downloaded.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(ckpt))
    assert detect_family(str(ckpt)) == "sd15"
    with pytest.raises(ModelLoadError) as err:
        load_diffusion_pipeline(str(ckpt), "sd15")
    assert str(err.value).startswith("Could not load the Stable Diffusion 1.x model") and "\n" not in str(err.value)
