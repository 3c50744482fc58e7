"""Each network type on the tiny image models, end to end: it trains, exports LyCORIS keys that pass the reload
check, continues through init_lora, and renders in the Testing tab's grid (strength 0 = the base exactly)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from lora_studio.config import TrainConfig
from helpers import run_job

KEYS = {"dora": ".dora_scale", "lokr": ".lokr_w1", "loha": ".hada_w2_b"}


def make_config(model: Path, data: Path, out: Path, **kw) -> TrainConfig:
    values = dict(base_model=str(model), train_data_dir=str(data), output_dir=str(out), resolution=64, lora_rank=4,
                  learning_rate=3e-3, batch_size=2, max_train_steps=3, save_steps=0, mixed_precision="no", seed=5)
    values.update(kw)
    return TrainConfig(**values).validate()


@pytest.mark.slow
@pytest.mark.parametrize("kind, family", [("dora", "sd15"), ("lokr", "sd15"), ("loha", "sd15"), ("lokr", "sdxl")])
def test_network_type_trains_exports_continues_and_renders(kind, family, tiny_sd15, tiny_sdxl, demo_images, tmp_path):
    from lora_studio.inference.grid import PipelineCache, RenderSettings, render_grid

    model = tiny_sdxl if family == "sdxl" else tiny_sd15
    job = run_job(make_config(model, demo_images, tmp_path / "a", network_type=kind,
                              train_text_encoder=family == "sdxl"))
    assert job.status == "finished", job.error
    assert any("Export check passed" in line for line in job.snapshot().log)
    lora = job.run.path / "my_lora.safetensors"
    with safe_open(str(lora), "pt") as fh:
        keys, meta = list(fh.keys()), fh.metadata()
    assert any(k.endswith(KEYS[kind]) for k in keys) and meta["ss_network_module"] == "lycoris.kohya"
    if family == "sdxl":
        assert any(k.startswith("lora_te2_") for k in keys) and any("_input_blocks_" in k for k in keys)
    assert not (job.run.path / "diffusers").exists()  # diffusers' format holds plain LoRA only

    more = run_job(make_config(model, demo_images, tmp_path / "b", network_type=kind, init_lora=str(lora),
                               max_train_steps=1, train_text_encoder=family == "sdxl", verify_export=False))
    assert more.status == "finished", more.error
    other = "loha" if kind != "loha" else "lokr"
    wrong = run_job(make_config(model, demo_images, tmp_path / "c", network_type=other, init_lora=str(lora),
                                train_text_encoder=family == "sdxl"))
    assert wrong.status == "failed" and f"network_type: {kind}" in wrong.error

    grid = render_grid(str(model), [("final", lora)], RenderSettings("a red circle", steps=2, width=64, height=64),
                       [0.0, 1.0], cache=PipelineCache())
    base, full = (np.asarray(im, dtype=np.float32) for im in grid.cells[0])
    assert base.shape == full.shape and np.abs(base - full).max() > 0
