"""The SD3.5 presets and memory estimate: each preset within 90% of its card by estimate, T5 caching alone (not
with both CLIPs), and the estimate above a real step of the full-size SD3.5 Large MMDiT on the meta device."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lora_studio.config import TrainConfig
from lora_studio.presets import list_presets, recommend_preset
from lora_studio.training.memory import estimate_breakdown
from test_sd3 import tiny_sd3  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent


LARGE, MEDIUM = "stabilityai/stable-diffusion-3.5-large", "stabilityai/stable-diffusion-3.5-medium"


def test_sd3_presets_fit_their_budget_by_estimate():
    presets = list_presets("sd3")
    assert [p.name for p in presets] == ["sd3_12gb", "sd3_16gb", "sd3_24gb", "sd3_medium_12gb", "sd3_medium_16gb",
                                         "sd3_medium_24gb"]
    for preset in presets:
        cfg = TrainConfig(base_model=MEDIUM if preset.variant else LARGE).replace(**preset.values)
        assert estimate_breakdown(cfg, "sd3").total_gb <= 0.9 * preset.vram_gb, preset.name
        assert cfg.timestep_sampling == "shift" and cfg.discrete_flow_shift == 3.0
    assert recommend_preset(24.0, "sd3").name == "sd3_24gb"
    assert recommend_preset(24.0, "sd3", "medium").name == "sd3_medium_24gb"
    bf16 = TrainConfig(base_model=LARGE).replace(**{**presets[1].values, "base_quantization": "none"})
    assert estimate_breakdown(bf16, "sd3").total_gb > 0.9 * 16  # why 16 GB stores the Large weights in fp8
    medium = TrainConfig(base_model=MEDIUM).replace(**presets[4].values)  # Medium's own figures: 2.2B weights
    assert estimate_breakdown(medium, "sd3").parts["transformer weights"] == pytest.approx(4.5, abs=0.05)
    assert estimate_breakdown(medium.replace(base_model=LARGE), "sd3").total_gb > 24  # Large at Medium's batch


def test_sd3_medium_is_told_from_its_name_a_folder_and_a_single_file(tiny_sd3, tmp_path):  # noqa: F811
    """Medium's MMDiT-X blocks (a second attention) tell it apart; its estimate then has no size warning."""
    from safetensors.torch import save_file

    from lora_studio.families import get_family
    from lora_studio.training.memory import size_note

    variant = get_family("sd3").variant_of
    assert [variant(MEDIUM), variant(LARGE), variant("stabilityai/stable-diffusion-3.5-large-turbo")] == [
        "medium", "", ""]
    assert variant(str(tiny_sd3)) == "medium"  # the tiny model has dual-attention blocks
    large_file, medium_file = tmp_path / "large.safetensors", tmp_path / "medium.safetensors"
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(1)}, str(large_file))
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight": torch.zeros(1)}, str(medium_file))
    assert (variant(str(large_file)), variant(str(medium_file))) == ("", "medium")
    assert "the released sd3 model's 2,243 M" in size_note(TrainConfig(base_model=str(tiny_sd3)), "sd3")


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
