"""Every SD3.5 and FLUX.2 preset runs as set on its tiny model (nf4 / fp8 base, 8-bit AdamW, checkpointing, bf16),
through the export check; the Training tab offers each family's presets and layers."""

from __future__ import annotations

import math

import pytest

from test_flux2 import tiny_dev, tiny_klein  # noqa: F401  (fixtures)
from test_sd3 import tiny_sd3  # noqa: F401  (fixture)


@pytest.mark.slow  # nine runs of 3-6 s each on 2 cores (dev's more), through the export check (swap: all blocks)
@pytest.mark.parametrize("name", ["sd3_12gb", "sd3_16gb", "sd3_24gb", "flux2_12gb", "flux2_16gb", "flux2_24gb",
                                  "flux2_klein9b_12gb", "flux2_dev_24gb", "sd3_medium_24gb"])
def test_every_sd3_and_flux2_preset_runs_as_set(name, tiny_sd3, tiny_klein, tiny_dev, demo_images,  # noqa: F811
                                                tmp_path, monkeypatch):
    from helpers import run_preset_as_set

    monkeypatch.setenv("LORA_STUDIO_CPU_CHECK", "1")  # bf16 and nf4 (bitsandbytes' CPU kernels) as on a GPU
    model = tiny_sd3 if name.startswith("sd3") else tiny_dev if "dev" in name else tiny_klein
    job = run_preset_as_set(name, model, demo_images, tmp_path / "out", steps=3)
    losses = [loss for _, loss in job.snapshot().losses]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


@pytest.mark.slow
def test_sd3_int8_base_in_bf16_passes_the_export_check(tiny_sd3, demo_images, tmp_path, monkeypatch):  # noqa: F811
    from helpers import run_job
    from test_sd3 import sd3_config

    monkeypatch.setenv("LORA_STUDIO_CPU_CHECK", "1")
    job = run_job(sd3_config(tiny_sd3, demo_images, tmp_path / "out", base_quantization="int8", max_train_steps=2,
                             mixed_precision="bf16"))
    assert job.status == "finished", job.error
    log = job.snapshot().log
    assert any("weights bfloat16, base int8" in line for line in log), log
    passed = [line for line in log if "Export check passed" in line]
    assert passed and "strength 0 vs base 0" in passed[0]


def test_training_tab_offers_the_families_presets_and_layers(tiny_sd3, tiny_klein):  # noqa: F811
    from lora_studio.ui.train_family import family_choices

    sd3 = family_choices(str(tiny_sd3), "auto", 16.0)
    assert sd3.family == "sd3" and sd3.group == "flow" and sd3.preset == "sd3_medium_16gb"  # Medium-shaped
    assert "attn2.to_q" in sd3.targets and "ff_context.net.2" in sd3.targets and "SD3.5" in sd3.text
    klein = family_choices(str(tiny_klein), "auto", 24.0)
    assert klein.family == "flux2" and klein.preset == "flux2_24gb" and "attn.to_qkv_mlp_proj" in klein.targets
