"""SD3.5 LoRAs on the tiny offline pipeline: train, export, reload with every layer placed, strength 0 = base,
exact resume, detection from a folder and from a single file's tensor names.

The exported file is loaded the way a user's diffusers script loads it (``load_lora_weights`` on a fresh
``StableDiffusion3Pipeline``) and the layers that really got the adapter are counted (diffusers drops keys it
does not recognise without a word). Every module must also be in ComfyUI's SD3 key map.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lora_studio.config import TrainConfig
from lora_studio.training.run_folder import RunFolder
from helpers import assert_reloads_in_diffusers, exported_file, flow_config, run_job, stop_then_resume


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    from lora_studio.models.tiny_sd3 import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("models") / "tiny-sd3")


def sd3_config(model: Path, data: Path, out: Path, **changes) -> TrainConfig:
    return flow_config(model, data, out, **{"lora_alpha": 2.0, "timestep_sampling": "shift",
                                            "discrete_flow_shift": 3.0, **changes})


@pytest.mark.slow
def test_sd3_lora_trains_exports_and_every_layer_is_placed(tiny_sd3, demo_images, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from lora_studio.export.diffusers_format import module_of
    from lora_studio.export.sd3_lora import comfy_maps_sd3

    job = run_job(sd3_config(tiny_sd3, demo_images, tmp_path / "out"))
    keys, meta = exported_file(job)
    lora = job.run.path / "my_lora.safetensors"
    modules = sorted({module_of(k) for k in keys})
    assert all(k.startswith("transformer.") and ".lora_" in k for k in keys)  # no alpha: diffusers' SD3 refuses it
    # attention: block 0 has both streams' q/k/v/out and attn2's (8 + 4); the last block has no to_add_out (7)
    assert len(modules) == 12 + 7
    assert all(comfy_maps_sd3(m.removeprefix("transformer.")) for m in modules)
    assert meta["ss_base_model_version"] == "sd3" and meta["ss_network_module"] == "networks.lora_sd3"
    assert meta["modelspec.architecture"] == "stable-diffusion-v3-5-medium/lora"  # the tiny model has attn2
    assert meta["ss_network_dim"] == "4" and meta["lora_studio_trained_alpha"] == "2.0" and meta["sshs_model_hash"]
    assert (job.run.path / "README.md").is_file()

    prompt = "a red circle on a light background"
    assert_reloads_in_diffusers(StableDiffusion3Pipeline.from_pretrained(tiny_sd3), lora, len(modules), prompt)

    # the Testing tab and `generate`: the family's pipeline through the grid's cache, CFG with a negative prompt
    from lora_studio.inference.grid import PipelineCache, RenderSettings, render_strengths

    settings = RenderSettings(prompt=prompt, negative="blurry", seed=1, steps=2, cfg=4.5, width=64, height=64)
    zero, one = render_strengths(str(tiny_sd3), lora, settings, (0.0, 1.0), cache=PipelineCache())
    assert np.asarray(zero).shape == (64, 64, 3) and np.abs(np.asarray(one, float) - np.asarray(zero, float)).max() > 0


def test_sd3_all_linear_and_block_filter(tiny_sd3, demo_images, tmp_path):
    from safetensors import safe_open

    job = run_job(sd3_config(tiny_sd3, demo_images, tmp_path / "out", lora_targets="all_linear",
                             train_double_block_indices="0", max_train_steps=1, verify_export=False))
    assert job.status == "finished", job.error
    with safe_open(str(job.run.path / "my_lora.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    assert any(".ff_context.net.2." in k for k in keys) and any(".attn2.to_q." in k for k in keys)
    assert not any("transformer_blocks.1." in k for k in keys)


@pytest.mark.slow
def test_sd3_resume_after_stop_gives_the_same_losses(tiny_sd3, demo_images, tmp_path):
    steps = 4
    full = run_job(sd3_config(tiny_sd3, demo_images, tmp_path / "a", max_train_steps=steps, save_steps=2,
                              verify_export=False, loss_weighting="sigma_sqrt"))
    assert full.status == "finished", full.error
    full_losses = [loss for _, loss in full.snapshot().losses]
    cfg = sd3_config(tiny_sd3, demo_images, tmp_path / "b", max_train_steps=steps, save_steps=2,
                     verify_export=False, loss_weighting="sigma_sqrt")
    resumed = stop_then_resume(cfg, stop_at=2)
    metrics = RunFolder(resumed.run.path).read_metrics()
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert [m["loss"] for m in metrics] == pytest.approx(full_losses, rel=1e-5, abs=1e-6)


def test_sd3_is_detected_from_a_folder_and_from_a_single_files_names(tiny_sd3, tmp_path):
    import torch
    from safetensors.torch import save_file

    from lora_studio.families import get_family
    from lora_studio.models.detect import detect_family

    assert detect_family(str(tiny_sd3)) == "sd3"
    single = tmp_path / "sd3.5_medium.safetensors"
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(2, 2),
               "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight": torch.zeros(2, 2)}, str(single))
    assert detect_family(str(single)) == "sd3"
    assert get_family("sd3").render_settings(str(single)) == {"steps": 40, "cfg": 4.5}  # Medium
    assert get_family("sd3").render_settings(str(tiny_sd3)) == {"steps": 40, "cfg": 4.5}  # tiny has attn2
    assert get_family("sd3").render_settings("/models/sd3.5-large-turbo") == {"steps": 4, "cfg": 0.0}
    lora = tmp_path / "lora.safetensors"  # a LoRA in that layout is not a base model
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_A.weight": torch.zeros(2, 2)}, str(lora))
    with pytest.raises(Exception, match="LoRA file"):
        detect_family(str(lora))


@pytest.mark.slow
def test_sd3_cached_conditioning_is_the_pipelines_own(tiny_sd3, demo_images, tmp_path):
    import torch

    from lora_studio.training.events import EventBus
    from lora_studio.training.sd3 import SD3Trainer

    cfg = sd3_config(tiny_sd3, demo_images, tmp_path / "out", caption_dropout_rate=0.5)
    trainer = SD3Trainer(cfg, RunFolder.create(cfg), EventBus())
    trainer.prepare()
    assert "" in trainer.text_cache and len(trainer.lora_target_modules()) == 19
    caption = trainer.items[0].caption
    embeds, _, pooled, _ = trainer.pipe.encode_prompt(caption, None, None, do_classifier_free_guidance=False,
                                                      max_sequence_length=32)
    cached = trainer.text_cache[caption]
    assert cached["prompt_embeds"].shape == (77 + 32, 64)  # CLIP's 77 tokens, then T5's
    assert torch.allclose(cached["prompt_embeds"], embeds[0], atol=1e-6)
    assert torch.allclose(cached["pooled"], pooled[0], atol=1e-6)


@pytest.mark.slow
def test_sd3_trains_from_a_single_file_in_stabilitys_layout(tiny_sd3, demo_images, tmp_path):
    import torch
    from diffusers import SD3Transformer2DModel

    from lora_studio.models.detect import detect_family
    from lora_studio.models.sd3_loading import load_sd3_transformer
    from lora_studio.models.tiny_sd3 import save_sd3_single_file

    single = save_sd3_single_file(tiny_sd3, tmp_path / "sd3.5_tiny.safetensors")
    assert detect_family(str(single)) == "sd3"
    loaded = load_sd3_transformer(str(single), single_file_config=str(tiny_sd3)).state_dict()
    expected = SD3Transformer2DModel.from_pretrained(tiny_sd3 / "transformer").state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    # the VAE, text encoders and configs from single_file_config; the export check reloads onto the same file
    job = run_job(sd3_config(single, demo_images, tmp_path / "out", single_file_config=str(tiny_sd3),
                             max_train_steps=2))
    exported_file(job)
