"""The SD3.5 presets and memory estimate: each preset within 90% of its card by estimate, T5 caching alone (not
with both CLIPs), and the estimate above a real step of the full-size SD3.5 Large MMDiT on the meta device."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lora_studio.config import TrainConfig
from lora_studio.presets import list_presets, recommend_preset
from lora_studio.training.memory import estimate_breakdown

ROOT = Path(__file__).resolve().parent.parent


def test_sd3_presets_fit_their_budget_by_estimate():
    presets = list_presets("sd3")
    assert [p.name for p in presets] == ["sd3_12gb", "sd3_16gb", "sd3_24gb"]
    for preset in presets:
        cfg = TrainConfig().replace(**preset.values)
        assert estimate_breakdown(cfg, "sd3").total_gb <= 0.9 * preset.vram_gb, preset.name
        assert cfg.timestep_sampling == "shift" and cfg.discrete_flow_shift == 3.0
    assert recommend_preset(24.0, "sd3").name == "sd3_24gb"
    bf16 = TrainConfig().replace(**{**presets[1].values, "base_quantization": "none"})
    assert estimate_breakdown(bf16, "sd3").total_gb > 0.9 * 16  # why 16 GB stores the Large weights in fp8


def test_sd3_estimate_counts_clip_tokens_and_t5_alone_while_caching():
    base = TrainConfig(gradient_checkpointing=True, mixed_precision="bf16", max_sequence_length=256)
    est = estimate_breakdown(base, "sd3")
    assert est.parts["transformer weights"] == pytest.approx(16.1, abs=0.05)
    assert est.parts["activations"] == pytest.approx((64 * 64 + 256 + 77) * 345_944 * 1.1 / 2**30, rel=0.2)
    assert est.caching_gb < 0.9 * 12  # T5-XXL (9.5 GB) alone, CLIP-L + G before it
    shuffled = estimate_breakdown(base.replace(shuffle_tags=True), "sd3")
    assert shuffled.parts["text encoder weights"] == pytest.approx(11.2, abs=0.1)  # all three stay


@pytest.mark.slow
def test_sd3_estimate_covers_a_measured_step_of_the_full_size_transformer():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from flow_memory import LARGE, build, step_peak

    cfg = TrainConfig(resolution=512, gradient_checkpointing=True, mixed_precision="bf16", max_sequence_length=256)
    lora_weights = sum(p.numel() * 4 for p in build("sd3", LARGE).parameters() if p.requires_grad)
    measured = (step_peak("sd3", LARGE, 512, True) + lora_weights) / 1e9
    parts = estimate_breakdown(cfg, "sd3").parts
    estimated = parts["activations"] + parts["LoRA weights, gradients and optimizer"]
    assert measured <= estimated <= 1.5 * measured, (measured, estimated)
