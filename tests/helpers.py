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
