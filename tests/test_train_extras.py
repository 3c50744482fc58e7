"""The Training tab's helpers without a browser: memory text, the multi-GPU command, a process-backed job."""

from __future__ import annotations

import sys

import pytest

from lora_studio.config import TrainConfig
from lora_studio.errors import StudioError
from lora_studio.training.process_job import ProcessJob
from lora_studio.ui.train_extras import command_text, memory_text


def test_memory_text_warns_only_when_the_gpu_is_too_small():
    cfg = TrainConfig(batch_size=8, resolution=1024).validate()
    assert "No CUDA GPU detected" in memory_text(cfg, "sdxl", None)
    assert "Warning" in memory_text(cfg, "sdxl", 4.0)
    assert "Fits this GPU" in memory_text(TrainConfig(batch_size=1).validate(), "sd15", 80.0)


def test_memory_text_says_when_the_model_is_not_full_size(tiny_sd15, tmp_path):
    """The estimate assumes the released model's size; for the demo's tiny model it says so."""
    from lora_studio.training.memory import unet_parameters

    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd15 / "unet")
    assert unet_parameters(str(tiny_sd15)) == sum(p.numel() for p in unet.parameters())
    text = memory_text(TrainConfig(base_model=str(tiny_sd15)).validate(), "sd15", None)
    assert "the estimate is for a full-size model" in text and "860 M" in text
    assert "full-size" not in memory_text(TrainConfig(base_model=str(tmp_path)).validate(), "sd15", None)


def test_command_text_for_one_and_two_gpus(tmp_path):
    path = tmp_path / "c.yaml"
    TrainConfig(mixed_precision="bf16").validate().save(path)
    assert command_text(path, 1, "python3") == f"python3 -m lora_studio train --config {path}"
    two = command_text(path, 2, "python3")
    assert two.startswith("accelerate launch --multi_gpu --num_processes 2")
    assert "--mixed_precision bf16" in two and two.endswith(f"-m lora_studio train --config {path}")


def test_process_job_reads_its_run_folder(tmp_path, monkeypatch):
    """A launched run that writes to its run folder and exits with an error shows as failed, with its log."""
    from lora_studio.training import process_job

    monkeypatch.setattr(process_job, "available_gpus", lambda: 2)
    monkeypatch.setattr(process_job, "launch_command", lambda *a, **k: [
        sys.executable, "-c", "import sys; print('hello from rank 0'); sys.exit(3)"])
    monkeypatch.setattr(TrainConfig, "require_paths", lambda self: None)
    job = ProcessJob(TrainConfig(output_dir=str(tmp_path)).validate(), 2).start()
    job.run.append_metrics({"step": 1, "loss": 0.5})
    assert job.wait(60)
    snap = job.snapshot()
    assert not job.is_running() and snap.status == "failed" and "exited with code 3" in snap.error
    assert snap.losses == [(1, 0.5)] and "hello from rank 0" in snap.log
    job.stop()
    assert (job.run.path / "commands" / "stop").is_file()


def test_more_gpus_than_the_machine_has_is_refused(tmp_path):
    with pytest.raises(StudioError, match="GPUs were asked for"):
        ProcessJob(TrainConfig(output_dir=str(tmp_path)).validate(), 64).start()


def test_target_help_lists_the_llm_layers(tmp_path):
    from lora_studio.models.tiny_llm import build_tiny_llm
    from lora_studio.ui.train_family import targets_info

    model = build_tiny_llm(tmp_path / "llm")
    text = targets_info(str(model), "llm")
    assert "q_proj" in text and "down_proj" in text
    assert "to_q" in targets_info("", "sd15")
