"""Strength grids: strength 0 is the base model exactly, other strengths differ, the grid PNG is labelled."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lora_studio.errors import ConfigError, ModelLoadError
from lora_studio.inference.grid import (DEFAULT_STRENGTHS, PipelineCache, RenderSettings, a1111_tag, compose_grid,
                                        parse_strengths, pick_device, render_grid, render_one,
                                        render_strengths)

SETTINGS = RenderSettings("a red circle", seed=7, steps=3, cfg=5.0, width=32, height=32)


def _write_random_lora(base: Path, folder: Path) -> Path:
    """A diffusers-format LoRA for the tiny UNet with large random weights (so strengths visibly differ)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet), weight_name="test_lora.safetensors",
        unet_lora_adapter_metadata={"r": 4, "lora_alpha": 4, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]})
    return folder / "test_lora.safetensors"


@pytest.fixture(scope="module")
def lora_file(tiny_sd15, tmp_path_factory) -> Path:
    return _write_random_lora(tiny_sd15, tmp_path_factory.mktemp("lora"))


@pytest.mark.slow
def test_strength_zero_is_the_base_model_and_strengths_differ(tiny_sd15, lora_file, tmp_path):
    from lora_studio.models.loading import load_diffusion_pipeline

    device, dtype = pick_device()  # the same device and precision the cache uses
    fresh = load_diffusion_pipeline(str(tiny_sd15), "sd15", torch_dtype=dtype).to(device)
    fresh.set_progress_bar_config(disable=True)
    base = np.asarray(render_one(fresh, SETTINGS, None, 0.0))

    cache = PipelineCache()
    images = render_strengths(str(tiny_sd15), lora_file, SETTINGS, [0.0, 0.5, 1.0], cache=cache)
    arrays = [np.asarray(im) for im in images]
    assert np.array_equal(arrays[0], base), "strength 0 must reproduce the base pipeline exactly"
    assert not np.array_equal(arrays[1], arrays[0])
    assert not np.array_equal(arrays[2], arrays[1])

    # Cached pipeline and adapter are reused; strength 0 after a LoRA render is still the base image.
    again = render_strengths(str(tiny_sd15), lora_file, SETTINGS, [1.0, 0.0], cache=cache)
    assert np.array_equal(np.asarray(again[0]), arrays[2])
    assert np.array_equal(np.asarray(again[1]), base)


@pytest.mark.slow
def test_checkpoint_grid_png_and_tags(tiny_sd15, lora_file, tmp_path):
    out = tmp_path / "grids" / "grid.png"
    cache = PipelineCache()
    seen = []
    result = render_grid(str(tiny_sd15), [("step 10", lora_file), ("final", lora_file)], SETTINGS, [0, 1],
                         cache=cache, out_path=out, progress=lambda d, t, label: seen.append((d, t)))
    assert out.is_file() and result.path == out
    assert result.row_labels == ["step 10", "final"] and result.col_labels == ["base (0)", "strength 1"]
    assert result.tags == ["<lora:test_lora:1>"]
    assert seen[-1] == (4, 4)
    from PIL import Image

    with Image.open(out) as saved:
        saved.load()
    assert saved.width >= 2 * 128 and saved.height > 2 * 128  # two cells wide, two rows plus the labels


def test_strength_parsing_and_tags():
    assert parse_strengths("") == list(DEFAULT_STRENGTHS)
    assert parse_strengths("0, 0.5; 1") == [0.0, 0.5, 1.0]
    with pytest.raises(ConfigError, match="not a number"):
        parse_strengths("0, half")
    assert a1111_tag("my_style", 0.8) == "<lora:my_style:0.8>"
    assert a1111_tag("my_style", 1.0) == "<lora:my_style:1>"


def test_bad_lora_file_is_a_clear_error(tiny_sd15, tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="broken.safetensors"):
        render_grid(str(tiny_sd15), [("x", bad)], SETTINGS, [1.0], cache=PipelineCache())


def test_compose_grid_sizes():
    from PIL import Image

    cells = [[Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")]]
    grid = compose_grid(cells, ["a"], ["0", "1"], title="t")
    assert grid.width >= 2 * 128
