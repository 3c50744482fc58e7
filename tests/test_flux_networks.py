"""FLUX.1 and Chroma with the network types, the caption options, masks, EMA and validation: each type trains,
writes its LyCORIS tensors on the transformer.* key map ComfyUI places, passes the export check (loaded through
PEFT), continues through init_lora and renders in the grid."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from helpers import run_job
from test_flux import flux_config, tiny_chroma, tiny_flux  # noqa: F401 (session fixtures)

KEYS = {"dora": ".dora_scale", "lokr": ".lokr_w1", "loha": ".hada_w2_b"}


@pytest.mark.slow
@pytest.mark.parametrize("kind, family", [("dora", "flux"), ("lokr", "flux"), ("loha", "chroma")])
def test_network_type_on_flow_matching(kind, family, tiny_flux, tiny_chroma, demo_images, tmp_path):  # noqa: F811
    from lora_studio.export.flux_lora import comfy_maps
    from lora_studio.inference.grid import PipelineCache, RenderSettings, render_grid

    model = tiny_chroma if family == "chroma" else tiny_flux
    (demo_images / "masks").mkdir()
    Image.new("L", (64, 64), 200).save(demo_images / "masks" / "img_003.png")
    job = run_job(flux_config(model, demo_images, tmp_path / "a", network_type=kind, max_train_steps=3,
                              validation_split=0.25, masked_loss=True, caption_dropout_rate=0.2, shuffle_tags=True,
                              ema_decay=0.5))
    assert job.status == "finished", job.error
    assert any("Export check passed" in line for line in job.snapshot().log)
    assert [m["step"] for m in job.run.read_metrics() if "val_loss" in m] == [3]
    lora = job.run.path / "my_lora.safetensors"
    with safe_open(str(lora), "pt") as fh:
        keys, meta = list(fh.keys()), fh.metadata()
    assert any(k.endswith(KEYS[kind]) for k in keys) and meta["ss_network_module"] == "lycoris.kohya"
    modules = {k.removeprefix("transformer.").rsplit(".", 2 if ".lora_" in k else 1)[0] for k in keys}
    assert all(k.startswith("transformer.") for k in keys) and all(comfy_maps(m) for m in modules)

    more = run_job(flux_config(model, demo_images, tmp_path / "b", network_type=kind, init_lora=str(lora),
                               max_train_steps=1, verify_export=False))
    assert more.status == "finished", more.error
    grid = render_grid(str(model), [("final", lora)], RenderSettings("a red circle", steps=2, width=64, height=64),
                       [0.0, 1.0], cache=PipelineCache())
    base, full = (np.asarray(im, dtype=np.float32) for im in grid.cells[0])
    assert np.abs(base - full).max() > 0
