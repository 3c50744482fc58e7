"""The settings GPU presets use, run on the CPU: bf16, 8-bit AdamW, 4-bit QLoRA, gradient checkpointing.

A GPU run keeps the frozen weights in fp16/bf16 (or 4-bit), the LoRA in fp32, and runs the model under
accelerate's autocast wrapper. On the CPU those settings are replaced by plain ones unless
``LORA_STUDIO_CPU_CHECK=1`` asks for them (bf16, bitsandbytes' CPU kernels), which these tests do, so a
mistake there (the export check comparing an autocast render with a float32 one, rounding the SDXL VAE that
training kept in fp32, a 4-bit LoRA that gets no gradient) fails here rather than in a user's run. Every
preset runs once on a tiny model; gradient checkpointing must train exactly the same LoRA as a run without.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_studio.config import TrainConfig
from lora_studio.training.runtime import make_accelerator, weight_dtype
from helpers import run_job, stop_then_resume

pytestmark = pytest.mark.slow  # every preset and precision on a tiny model: long, run in CI


@pytest.fixture()
def cpu_check(monkeypatch):
    monkeypatch.setenv("LORA_STUDIO_CPU_CHECK", "1")


def _image_config(model: Path, data: Path, out: Path) -> TrainConfig:
    return TrainConfig(base_model=str(model), train_data_dir=str(data), output_dir=str(out), resolution=64,
                       lora_rank=4, learning_rate=3e-3, batch_size=2, max_train_steps=6, save_steps=3,
                       mixed_precision="bf16", train_text_encoder=True, seed=5).validate()


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_bf16_image_lora_trains_and_passes_the_export_check(family, tiny_sd15, tiny_sdxl, demo_images, tmp_path,
                                                            cpu_check):
    model = tiny_sd15 if family == "sd15" else tiny_sdxl
    job = run_job(_image_config(model, demo_images, tmp_path / "out"))
    assert job.status == "finished", job.error
    log = job.snapshot().log
    assert any("weights bfloat16" in line for line in log), log
    passed = [line for line in log if "Export check passed" in line]
    assert passed, log
    # Reloaded within 1e-3 (fp16 rounding of the file's LoRA weights), far inside the 0.01 tolerance that an
    # autocast render or a differently rounded VAE overshot; strength 0 gives the base exactly.
    within = float(passed[0].split("within ")[1].split(" ")[0])
    assert within < 1e-3 and "strength 0 vs base 0" in passed[0], passed[0]
    losses = [loss for _, loss in job.snapshot().losses]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert [step for step, _ in job.run.list_checkpoints()] == [3]  # the last step is the export


def test_bf16_llm_lora_trains_and_passes_the_export_check(tmp_path, cpu_check):
    from lora_studio.models.tiny_llm import build_tiny_llm, make_demo_llm_data

    model = build_tiny_llm(tmp_path / "tiny-llm")
    data = make_demo_llm_data(tmp_path / "train.jsonl")
    cfg = TrainConfig(base_model=str(model), train_data_dir=str(data), output_dir=str(tmp_path / "out"), lora_rank=4,
                      learning_rate=5e-2, batch_size=4, max_train_steps=16, save_steps=0, mixed_precision="bf16",
                      seed=7, lr_scheduler="constant", max_seq_length=64).validate()
    job = run_job(cfg)
    assert job.status == "finished", job.error
    log = job.snapshot().log
    assert any("weights bfloat16" in line for line in log), log
    assert any("Export check passed" in line for line in log), log
    losses = [loss for _, loss in job.snapshot().losses]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4


def test_without_the_switch_the_cpu_trains_in_full_precision(tmp_path, monkeypatch):
    """Also: one process may create accelerators of different precisions one after another, as the app does
    when a bf16 run is followed by a full-precision one."""
    monkeypatch.delenv("LORA_STUDIO_CPU_CHECK", raising=False)
    said: list[str] = []
    acc = make_accelerator(TrainConfig(output_dir=str(tmp_path), mixed_precision="bf16"), say=said.append)
    assert weight_dtype(acc) == torch.float32
    assert said and "full precision" in said[0] and "'bf16' is ignored" in said[0]
    monkeypatch.setenv("LORA_STUDIO_CPU_CHECK", "1")  # fp16 stays off on the CPU: the switch is for bf16 only
    acc = make_accelerator(TrainConfig(output_dir=str(tmp_path), mixed_precision="fp16"), say=said.append)
    assert weight_dtype(acc) == torch.float32
    acc = make_accelerator(TrainConfig(output_dir=str(tmp_path), mixed_precision="bf16"), say=said.append)
    assert weight_dtype(acc) == torch.bfloat16
    acc = make_accelerator(TrainConfig(output_dir=str(tmp_path), mixed_precision="no"), say=said.append)
    assert weight_dtype(acc) == torch.float32


@pytest.mark.parametrize("family,train_text_encoder", [("sd15", False), ("sdxl", True)])
def test_gradient_checkpointing_trains_the_same_lora(family, train_text_encoder, tiny_sd15, tiny_sdxl, demo_images,
                                                     tmp_path):
    """Checkpointing (on in every 12/16 GB preset) only trades time for memory: the same losses and LoRA.

    A checkpointed frozen model whose inputs need no gradient can silently cut the LoRA off from the loss
    (reentrant checkpointing); then the losses after the first step would differ.
    """
    from safetensors.torch import load_file

    model = tiny_sd15 if family == "sd15" else tiny_sdxl
    runs = {}
    for checkpointing in (False, True):
        cfg = TrainConfig(base_model=str(model), train_data_dir=str(demo_images), resolution=64, lora_rank=4,
                          output_dir=str(tmp_path / f"ckpt_{checkpointing}"), learning_rate=3e-3, batch_size=2,
                          max_train_steps=4, save_steps=0, mixed_precision="no", seed=3, verify_export=False,
                          gradient_checkpointing=checkpointing, train_text_encoder=train_text_encoder).validate()
        job = run_job(cfg)
        assert job.status == "finished", job.error
        runs[checkpointing] = ([loss for _, loss in job.snapshot().losses],
                               load_file(str(job.run.path / "my_lora.safetensors")))
    (plain_losses, plain), (ckpt_losses, ckpt) = runs[False], runs[True]
    assert ckpt_losses == pytest.approx(plain_losses, rel=1e-5) and plain_losses[0] != plain_losses[-1]
    assert plain.keys() == ckpt.keys()
    assert any(k.startswith("lora_te") for k in plain) == train_text_encoder
    for key in plain:
        torch.testing.assert_close(ckpt[key].float(), plain[key].float(), rtol=1e-3, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_llm64(tmp_path_factory):
    """A tiny LLM whose layers are a multiple of bitsandbytes' 4-bit block size (64), as real ones are."""
    from lora_studio.models.tiny_llm import build_tiny_llm, make_demo_llm_data

    root = tmp_path_factory.mktemp("llm64")
    return build_tiny_llm(root / "model", hidden=64), make_demo_llm_data(root / "train.jsonl")


def _preset_names(family: str) -> list[str]:
    from lora_studio.presets import list_presets

    return [p.name for p in list_presets(family)]


@pytest.mark.parametrize("name", _preset_names("sd15") + _preset_names("sdxl") + _preset_names("llm"))
def test_every_preset_runs_as_set(name, tiny_sd15, tiny_sdxl, tiny_llm64, demo_images, tmp_path, cpu_check):
    """The preset's own settings (precision, optimizer, checkpointing, 4-bit), on a tiny model and small shapes."""
    from lora_studio.presets import get_preset

    preset = get_preset(name)
    family = preset.family
    small = dict(max_train_steps=8, save_steps=0, seed=1, gradient_accumulation_steps=1,
                 batch_size=min(preset.values.get("batch_size", 1), 2), output_dir=str(tmp_path / "out"))
    if family == "llm":
        model, data = tiny_llm64
        small.update(base_model=str(model), train_data_dir=str(data), max_seq_length=64, learning_rate=5e-2,
                     lr_scheduler="constant", lora_rank=4)
    else:
        small.update(base_model=str(tiny_sd15 if family == "sd15" else tiny_sdxl), train_data_dir=str(demo_images),
                     resolution=64, learning_rate=3e-3, lora_rank=4)
    cfg = TrainConfig().replace(**preset.values).replace(**small).validate()
    job = run_job(cfg)
    assert job.status == "finished", job.error
    log = job.snapshot().log
    assert any("Export check passed" in line for line in log), log
    assert not any("learned very little" in line for line in log), log
    assert not any("instead" in line for line in log), log  # no 8-bit or 4-bit fallback under the CPU check
    if cfg.load_in_4bit:
        assert any("4-bit NF4 (QLoRA)" in line for line in log), log
    elif cfg.mixed_precision == "bf16":
        assert any("weights bfloat16" in line for line in log), log
    losses = [loss for _, loss in job.snapshot().losses]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    if family == "llm":
        assert sum(losses[-3:]) < sum(losses[:3]), losses


def test_bf16_resume_after_stop_gives_the_same_losses(tiny_sdxl, demo_images, tmp_path, cpu_check):
    """Resume in mixed precision: the fp32 LoRA, optimizer and RNG state restore the run exactly."""
    from lora_studio.training.run_folder import RunFolder

    def config(out: str) -> TrainConfig:
        return TrainConfig(base_model=str(tiny_sdxl), train_data_dir=str(demo_images), output_dir=str(tmp_path / out),
                           resolution=64, lora_rank=4, learning_rate=3e-3, batch_size=2, max_train_steps=6,
                           save_steps=2, mixed_precision="bf16", seed=9, verify_export=False).validate()

    full = run_job(config("a"))
    assert full.status == "finished", full.error
    resumed = stop_then_resume(config("b"), stop_at=3)
    losses = [m["loss"] for m in RunFolder(resumed.run.path).read_metrics()]
    assert losses == pytest.approx([loss for _, loss in full.snapshot().losses], rel=1e-5, abs=1e-6)
