"""The LLM trainer end to end on the tiny Llama: learning, checkpoints, exact resume, init_lora, messages."""

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


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> Path:
    from lora_studio.models.tiny_llm import build_tiny_llm

    return build_tiny_llm(tmp_path_factory.mktemp("models") / "tiny-llm")


@pytest.fixture(scope="module")
def llm_data(tmp_path_factory) -> Path:
    from lora_studio.models.tiny_llm import make_demo_llm_data

    return make_demo_llm_data(tmp_path_factory.mktemp("data") / "train.jsonl")


def make_config(model: Path, data: Path, out: Path, **kw) -> TrainConfig:
    values = dict(base_model=str(model), train_data_dir=str(data), output_dir=str(out), lora_rank=4,
                  learning_rate=2e-2, batch_size=4, max_train_steps=6, save_steps=0, mixed_precision="no", seed=7,
                  lr_scheduler="constant", max_seq_length=64)
    values.update(kw)
    return TrainConfig(**values).validate()



def test_loss_goes_down_and_exports_a_checked_adapter(tiny_llm, llm_data, tmp_path):
    job = run_job(make_config(tiny_llm, llm_data, tmp_path / "out", max_train_steps=24, learning_rate=5e-2))
    assert job.status == "finished", job.error
    losses = [loss for _, loss in job.snapshot().losses]
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5
    adapter = job.run.path / "my_lora"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert not config.get("modules_to_save") and config["base_model_name_or_path"] == str(tiny_llm)
    log = job.snapshot().log
    assert any("16 rows read" in line and "alpaca 16" in line for line in log)
    assert any("Export check passed" in line and "identical logits" in line for line in log)
    assert all(m["tokens_per_s"] >= 0 for m in job.run.read_metrics())
    card = (job.run.path / "README.md").read_text(encoding="utf-8")
    assert "my_lora" in card and str(tiny_llm) in card
    assert job.run.read_state()["files"] == [str(adapter)]


def test_family_is_detected_and_loss_matches_the_models_own(tiny_llm, llm_data, tmp_path):
    from lora_studio.data.llm_data import collate, preflight_llm
    from lora_studio.models.detect import detect_family
    from lora_studio.models.llm import load_causal_lm
    from lora_studio.training.llm import answer_logits_mode, causal_lm_loss

    assert detect_family(str(tiny_llm)) == "llm"
    model = load_causal_lm(str(tiny_llm))
    assert answer_logits_mode(model) == "mask"
    report = preflight_llm(llm_data, str(tiny_llm), 64)
    batch = collate(report.examples[:4], 2)
    with torch.no_grad():
        expected = causal_lm_loss(model, batch, "labels")
        for mode in ("mask", "index"):
            assert causal_lm_loss(model, batch, mode) == pytest.approx(float(expected), rel=1e-5)


def test_resume_after_stop_gives_the_same_losses(tiny_llm, llm_data, tmp_path):
    steps = 8
    kw = dict(max_train_steps=steps, save_steps=3, verify_export=False, lora_dropout=0.1, batch_size=3)
    full = run_job(make_config(tiny_llm, llm_data, tmp_path / "a", **kw))
    assert full.status == "finished", full.error
    full_losses = [loss for _, loss in full.snapshot().losses]

    first = TrainingJob(make_config(tiny_llm, llm_data, tmp_path / "b", **kw))
    first.bus.subscribe(lambda e: first.stop() if isinstance(e, Progress) and e.step == 5 else None)
    first.start().wait(600)
    assert first.status == "stopped", first.error
    run = first.run
    assert [s for s, _ in run.list_checkpoints()] == [3, 5]
    ckpt = run.latest_checkpoint()[1]
    assert (ckpt / "my_lora-step000005" / "adapter_config.json").is_file()

    resumed = TrainingJob.resume(run.path)
    resumed.start().wait(600)
    assert resumed.status == "finished", resumed.error
    metrics = RunFolder(run.path).read_metrics()
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert [m["loss"] for m in metrics] == pytest.approx(full_losses, rel=1e-5, abs=1e-6)


def test_init_lora_continues_from_an_adapter_folder(tiny_llm, llm_data, tmp_path):
    from lora_studio.export.peft_llm import load_adapter_model

    first = run_job(make_config(tiny_llm, llm_data, tmp_path / "a", max_train_steps=4, verify_export=False,
                                target_modules=["q_proj", "k_proj"], lora_rank=2))
    adapter = first.run.path / "my_lora"
    second = run_job(make_config(tiny_llm, llm_data, tmp_path / "b", max_train_steps=2, init_lora=str(adapter)))
    assert second.status == "finished", second.error
    assert any("Continuing from the adapter" in line for line in second.snapshot().log)
    config = json.loads((second.run.path / "my_lora" / "adapter_config.json").read_text())
    assert config["r"] == 2 and sorted(config["target_modules"]) == ["k_proj", "q_proj"]  # the adapter's own
    # the continued adapter starts from the first one: its first loss is the first run's last loss or lower
    first_losses = [loss for _, loss in first.snapshot().losses]
    second_losses = [loss for _, loss in second.snapshot().losses]
    assert second_losses[0] < first_losses[0]
    load_adapter_model(tiny_llm, second.run.path / "my_lora")  # and it loads


@pytest.mark.parametrize("change, words", [
    ({"target_modules": ["to_q"]}, "'to_q' matches no layer of this model; its Linear layers are: q_proj, k_proj, "
                                   "v_proj, o_proj, gate_proj, up_proj, down_proj"),
    ({"init_lora": "nowhere"}, "is not a PEFT adapter folder"),
    ({"train_data_dir": "missing.jsonl"}, "does not exist"),
    ({"model_family": "sdxl"}, "model_family is 'sdxl' but"),
])
def test_mistakes_fail_with_a_clear_message(tiny_llm, llm_data, tmp_path, change, words):
    job = run_job(make_config(tiny_llm, llm_data, tmp_path / "out", **change))
    assert job.status == "failed"
    assert words in job.error


def test_qlora_without_cuda_falls_back_with_a_message(tiny_llm, llm_data, tmp_path):
    job = run_job(make_config(tiny_llm, llm_data, tmp_path / "out", load_in_4bit=True, max_train_steps=2,
                              gradient_checkpointing=True, target_modules=["all-linear"]))
    assert job.status == "finished", job.error
    assert any("load_in_4bit (QLoRA) needs a CUDA GPU" in line for line in job.snapshot().log)
    config = json.loads((job.run.path / "my_lora" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"])


def test_linear_names_for_the_target_picker(tiny_llm):
    from lora_studio.models.llm import linear_module_names

    assert linear_module_names(tiny_llm) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_sample_answers_are_written_during_training(tiny_llm, llm_data, tmp_path):
    job = run_job(make_config(tiny_llm, llm_data, tmp_path / "out", max_train_steps=2, sample_prompt="What do bees make?",
                              sample_steps=2, verify_export=False))
    assert job.status == "finished", job.error
    sample = job.run.samples_dir / "step_000002.txt"
    assert sample.read_text().startswith("Prompt: What do bees make?")


def test_llm_presets_exist_for_each_memory_size():
    from lora_studio.config import load_config
    from lora_studio.presets import list_presets, recommend_preset

    presets = list_presets("llm")
    assert [p.vram_gb for p in presets] == [12, 16, 24]
    assert all("fits" in p.description for p in presets)
    assert load_config(preset="llm_12gb").load_in_4bit and not load_config(preset="llm_24gb").load_in_4bit
    assert recommend_preset(24.0, "llm").name == "llm_24gb"


@pytest.mark.slow
def test_cli_trains_an_llm_lora(tiny_llm, llm_data, tmp_path):
    config = tmp_path / "llm.yaml"
    config.write_text(f"base_model: {tiny_llm}\ntrain_data_dir: {llm_data}\noutput_dir: {tmp_path / 'out'}\n"
                      "max_train_steps: 2\nlora_rank: 4\nmax_seq_length: 64\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "lora_studio", "train", "--config", str(config), "--preset", "llm_12gb"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "load_in_4bit (QLoRA) needs a CUDA GPU" in proc.stderr
    assert list((tmp_path / "out").glob("*/my_lora/adapter_model.safetensors"))


def test_out_of_memory_advice_names_the_next_llm_preset():
    from lora_studio.config import load_config
    from lora_studio.training.loop import out_of_memory_advice

    text = out_of_memory_advice(load_config(preset="llm_24gb"), "llm")
    assert "max_seq_length 2048" in text and "'llm_16gb'" in text and "load_in_4bit: true" in text
