"""Small helpers shared by the training tests (imported as ``helpers``; pytest puts tests/ on sys.path)."""

from __future__ import annotations

from lora_studio.config import TrainConfig
from lora_studio.training.events import Progress
from lora_studio.training.job import TrainingJob


def run_job(cfg: TrainConfig, timeout: float = 600) -> TrainingJob:
    """Start a training job and wait until it has finished, stopped or failed."""
    job = TrainingJob(cfg).start()
    assert job.wait(timeout), "the training job did not end in time"
    return job


def stop_then_resume(cfg: TrainConfig, stop_at: int, timeout: float = 600) -> TrainingJob:
    """A run stopped (as the Stop button does) once step ``stop_at`` is done, then resumed from its run folder
    to the end; returns the resumed job (its ``run`` is the same folder)."""
    first = TrainingJob(cfg)
    first.bus.subscribe(lambda e: first.stop() if isinstance(e, Progress) and e.step == stop_at else None)
    first.start().wait(timeout)
    assert first.status == "stopped", first.error
    resumed = TrainingJob.resume(first.run.path)
    resumed.start().wait(timeout)
    assert resumed.status == "finished", resumed.error
    return resumed


def flow_config(model, data, out, **changes) -> TrainConfig:
    """A short run on a tiny flow-matching model (64 px, rank 4, batch 2, 3 steps, 32 text tokens)."""
    values = dict(base_model=str(model), train_data_dir=str(data), output_dir=str(out), resolution=64, lora_rank=4,
                  learning_rate=1e-2, batch_size=2, max_train_steps=3, save_steps=0, seed=3, max_sequence_length=32)
    values.update(changes)
    return TrainConfig(**values).validate()


def assert_reloads_in_diffusers(pipe, lora, modules: int, prompt: str = "a red circle on a light background") -> None:
    """Load ``lora`` into ``pipe`` as a user's diffusers script does: every one of ``modules`` layers placed (counted,
    as diffusers drops unknown keys silently), strength 0 renders the base exactly, strength 1 differs."""
    import numpy as np

    from lora_studio.export.verify import count_placed, render

    pipe.set_progress_bar_config(disable=True)
    base = render(pipe, prompt, 1, steps=2, size=64)
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="mine")
    assert count_placed(pipe.transformer, "mine") == modules
    pipe.set_adapters(["mine"], adapter_weights=[0.0])
    assert np.array_equal(render(pipe, prompt, 1, steps=2, size=64), base)
    pipe.set_adapters(["mine"], adapter_weights=[1.0])
    assert np.abs(render(pipe, prompt, 1, steps=2, size=64) - base).max() > 1e-3


def run_preset_as_set(name: str, model, data, out, steps: int = 4) -> TrainingJob:
    """A hardware preset's own settings (quantized base, 8-bit AdamW, checkpointing, bf16) on a tiny model: 64 px,
    batch at most 2, rank 4, ``steps`` steps, through the export check. Set LORA_STUDIO_CPU_CHECK first."""
    from lora_studio.presets import get_preset

    preset = get_preset(name)
    cfg = TrainConfig().replace(**preset.values).replace(
        base_model=str(model), train_data_dir=str(data), output_dir=str(out), resolution=64,
        batch_size=min(preset.values["batch_size"], 2), max_train_steps=steps, save_steps=0, lora_rank=4,
        learning_rate=1e-2, max_sequence_length=32).validate()
    job = run_job(cfg)
    assert job.status == "finished", job.error
    log = job.snapshot().log
    assert any(f"weights bfloat16, base {cfg.base_quantization}" in line for line in log), log
    assert not any("instead" in line for line in log), log  # no fallback of the quantized base or 8-bit AdamW
    assert any("Export check passed" in line for line in log), log
    return job


def exported_file(job: TrainingJob) -> tuple[list[str], dict[str, str]]:
    """(keys, metadata) of a finished run's LoRA file, after checking that the export check passed with strength 0
    giving the base exactly and strength 1 the trained model within 1e-3."""
    from safetensors import safe_open

    assert job.status == "finished", job.error
    log = job.snapshot().log
    passed = [line for line in log if "Export check passed" in line]
    assert passed and "strength 0 vs base 0" in passed[0], log
    assert float(passed[0].split("within ")[1].split(" ")[0]) < 1e-3
    with safe_open(str(job.run.path / "my_lora.safetensors"), "pt") as fh:
        return list(fh.keys()), fh.metadata()
