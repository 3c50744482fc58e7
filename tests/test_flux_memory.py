"""The FLUX presets and memory estimate: each preset within 90% of its card by estimate, the estimate above a
real step measured on the meta device, auto_fit's FLUX step (nf4), and bench_memory's FLUX table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lora_studio.config import TrainConfig
from lora_studio.presets import list_presets, recommend_preset
from lora_studio.training.memory import estimate_breakdown, next_step_down
from test_flux import tiny_flux  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent


def test_flux_presets_fit_their_budget_by_estimate_and_12gb_swaps_the_fewest_blocks_that_fit():
    presets = list_presets("flux")
    assert [p.name for p in presets] == ["flux_12gb", "flux_16gb", "flux_24gb"]
    for preset in presets:
        cfg = TrainConfig().replace(**preset.values)
        for family in ("flux", "chroma"):
            assert estimate_breakdown(cfg, family).total_gb <= 0.9 * preset.vram_gb, (preset.name, family)
    twelve = TrainConfig().replace(**presets[0].values).validate()
    assert (twelve.resolution, twelve.base_quantization, twelve.blocks_to_swap) == (1024, "fp8", 41)
    assert estimate_breakdown(twelve.replace(blocks_to_swap=40), "flux").total_gb > 0.9 * 12  # 41 is the fewest
    assert recommend_preset(16.0, "flux").name == "flux_16gb"


def test_flux_estimate_follows_quantization_tokens_and_block_filters():
    base = TrainConfig(base_quantization="none", gradient_checkpointing=True, mixed_precision="bf16")
    weights = {q: estimate_breakdown(base.replace(base_quantization=q), "flux").parts["transformer weights"]
               for q in ("none", "fp8", "nf4")}
    assert weights["none"] == pytest.approx(23.8, abs=0.1) and weights["fp8"] == pytest.approx(11.9, abs=0.1)
    assert weights["nf4"] == pytest.approx(6.76, abs=0.05)
    act = lambda **kw: estimate_breakdown(base.replace(**kw), "flux").parts["activations"]  # noqa: E731
    assert act(max_sequence_length=256) < act() and act(batch_size=2) == pytest.approx(2 * act(), rel=1e-3)
    lora = lambda **kw: estimate_breakdown(base.replace(**kw), "flux").parts["LoRA weights, gradients and optimizer"]  # noqa: E731
    assert lora(train_single_block_indices="none") < lora() < lora(lora_targets="all_linear")


def test_auto_fit_puts_a_flux_base_in_nf4_before_lowering_the_resolution():
    cfg = TrainConfig(batch_size=1, gradient_checkpointing=True, optimizer="adamw8bit", base_quantization="fp8")
    step = next_step_down(cfg, "flux")
    assert step.config.base_quantization == "nf4" and not step.resumable
    assert step.change == "base_quantization fp8 -> nf4 (4-bit transformer weights)"
    assert next_step_down(step.config, "flux").change == "resolution 1024 -> 896"


@pytest.mark.slow
def test_flux_estimate_covers_a_measured_step_of_the_full_size_transformer():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from flux_memory import build_flux, measure_flux_step_peak

    cfg = TrainConfig(resolution=512, gradient_checkpointing=True, mixed_precision="bf16")
    peak = measure_flux_step_peak(512, 1, True)
    lora_weights = sum(p.numel() * 4 for p in build_flux().parameters() if p.requires_grad)
    parts = estimate_breakdown(cfg, "flux").parts
    estimated = parts["activations"] + parts["LoRA weights, gradients and optimizer"]
    measured = (peak.step_peak_bytes + lora_weights) / 1e9
    assert measured <= estimated <= 1.3 * measured, (measured, estimated)


def test_the_estimate_says_when_a_flux_model_is_not_full_size(tiny_flux):  # noqa: F811
    from lora_studio.ui.train_extras import memory_text

    text = memory_text(TrainConfig(base_model=str(tiny_flux)).validate(), "flux", None)
    assert "This model's transformer has" in text and "11,901 M: the estimate is for a full-size model" in text


def test_the_estimate_counts_swapped_blocks_out_and_one_block_in_flight():
    """FLUX.1's blocks on the meta device (benchmarks/block_swap_sizes.py): 19 double blocks of 339.8 M weights then
    38 single blocks of 141.6 M; blocks_to_swap N takes the last N out of the resident weights, one comes back."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from block_swap_sizes import block_runs, models

    from lora_studio.training.memory_flux import FLOW_FIGURES, swap_note

    for family in FLOW_FIGURES:
        total, runs = block_runs(*models()[family])
        assert total == FLOW_FIGURES[family].transformer_params and runs == FLOW_FIGURES[family].swap_runs, family
    cfg = TrainConfig(base_quantization="fp8", gradient_checkpointing=True, mixed_precision="bf16")
    parts = lambda n: estimate_breakdown(cfg.replace(blocks_to_swap=n), "flux").parts  # noqa: E731
    assert "swapped block in flight" not in parts(0)
    assert parts(0)["transformer weights"] - parts(38)["transformer weights"] == pytest.approx(38 * 0.1416, abs=0.01)
    assert parts(38)["swapped block in flight"] == pytest.approx(0.1416 * 3, abs=0.01)  # fp8 + its bf16 cast
    assert parts(39)["transformer weights"] == pytest.approx(parts(38)["transformer weights"] - 0.3398, abs=0.01)
    assert parts(39)["swapped block in flight"] == pytest.approx(0.3398 * 3, abs=0.01)
    assert swap_note(cfg, "flux") is None
    note = swap_note(cfg.replace(blocks_to_swap=41), "flux")
    assert note.startswith("blocks_to_swap 41: 6.4 GB of block weights stay in CPU memory") and "12.8 GB" in note


def test_auto_fit_keeps_a_swapping_base_out_of_nf4():
    cfg = TrainConfig(batch_size=1, gradient_checkpointing=True, optimizer="adamw8bit", base_quantization="fp8",
                      blocks_to_swap=41, resolution=1024)
    assert next_step_down(cfg, "flux").change == "resolution 1024 -> 896"
