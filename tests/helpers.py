"""Small helpers shared by the training tests (imported as ``helpers``; pytest puts tests/ on sys.path)."""

from __future__ import annotations

from lora_studio.config import TrainConfig
from lora_studio.training.job import TrainingJob


def run_job(cfg: TrainConfig, timeout: float = 600) -> TrainingJob:
    """Start a training job and wait until it has finished, stopped or failed."""
    job = TrainingJob(cfg).start()
    assert job.wait(timeout), "the training job did not end in time"
    return job
