"""The miniature build scripts still run: every stage of every family, with a few steps each.

The committed weights come from the same scripts at full length (``build.json`` in each folder says how);
these runs check the code path, not the quality (which ``test_miniature_models.py`` checks on the weights).
"""

from __future__ import annotations

import json

import pytest
import torch

from lora_studio.miniature.build import build

SCALE = 0.002


@pytest.mark.slow
def test_sd15_build_runs_and_records_its_recipe(tmp_path):
    record = build("sd15", tmp_path / "sd15", scale=SCALE, threads=1)
    assert record["recipe"]["unet_steps"] == 5 and record["recipe"]["seed"] == 1300
    saved = json.loads((tmp_path / "sd15" / "build.json").read_text())
    assert saved["measured"]["vae"]["pixel_mae"] >= 0 and 0 <= saved["measured"]["colour_accuracy"] <= 1
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "sd15")
    assert pipe.text_encoder.dtype == torch.float32, "the text encoder stays fp32 (DESIGN.md)"
    for family in ("sd15_v", "sdxl"):  # both start from an sd15 miniature
        record = build(family, tmp_path / family, scale=SCALE, base=tmp_path / "sd15", threads=1)
        assert record["family"] == family
    scheduler = StableDiffusionPipeline.from_pretrained(tmp_path / "sd15_v").scheduler
    assert scheduler.config.prediction_type == "v_prediction"


@pytest.mark.parametrize("family", ["llm", "blip"])
def test_llm_and_captioner_builds_run(family, tmp_path):
    record = build(family, tmp_path / family, scale=SCALE, threads=1)
    assert record["recipe"]["steps"] == max(2, int({"llm": 1200, "blip": 4000}[family] * SCALE))
    assert (tmp_path / family / "config.json").is_file()


@pytest.mark.slow
def test_flux_build_runs_from_the_sd15_vae(tmp_path):
    """The FLUX miniature's build: the sd15 miniature's VAE made 16-channel (it decodes exactly what the sd15 VAE
    decodes), and a few flow-matching steps; the folder loads as a FluxPipeline and renders."""
    from diffusers import FluxPipeline

    from lora_studio.miniature import world
    from lora_studio.miniature.build_flux import flux_vae_from
    from lora_studio.miniature.build_sd import _base_pipe
    from lora_studio.miniature.store import miniature_dir

    record = build("flux", tmp_path / "flux", scale=SCALE, threads=1)
    assert record["recipe"]["steps"] == 6 and record["recipe"]["seed"] == 1400
    pipe = FluxPipeline.from_pretrained(tmp_path / "flux")
    assert pipe.vae.config.latent_channels == 16 and pipe.transformer.config.in_channels == 64
    assert pipe.tokenizer_2.model_max_length == 32 and pipe.text_encoder_2.dtype == torch.float32
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, max_sequence_length=32).images[0]
    assert image.size == (64, 64)

    sd_vae = _base_pipe(miniature_dir("sd15")).vae
    x = torch.from_numpy(world.pixels(world.world_scenes(4, seed=5)))
    vae = flux_vae_from(sd_vae, x, seed=1)
    with torch.no_grad():
        expected = sd_vae.decode(sd_vae.encode(x).latent_dist.mean).sample
        got = vae.decode(vae.encode(x).latent_dist.mean).sample
    assert (got - expected).abs().max() < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("family, pipeline", [("z_image", "ZImagePipeline"), ("sd3", "StableDiffusion3Pipeline")])
def test_flow_family_builds_run_on_the_flux_vae(family, pipeline, tmp_path):
    """Z-Image's and SD3's builds: a few flow-matching steps on the FLUX miniature's VAE (taken as it is); the folder
    loads as the family's pipeline, with fp32 text encoders, and renders."""
    import diffusers

    from lora_studio.miniature.store import miniature_dir

    record = build(family, tmp_path / family, scale=SCALE, threads=1)
    assert record["recipe"]["steps"] == {"z_image": 12, "sd3": 6}[family]
    assert record["recipe"]["seed"] == {"z_image": 1500, "sd3": 1600}[family]
    pipe = getattr(diffusers, pipeline).from_pretrained(tmp_path / family)
    flux_vae = diffusers.AutoencoderKL.from_pretrained(miniature_dir("flux"), subfolder="vae")
    assert pipe.vae.config.shift_factor == flux_vae.config.shift_factor
    assert all(torch.equal(a, b) for a, b in zip(pipe.vae.state_dict().values(), flux_vae.state_dict().values()))
    encoders = [getattr(pipe, n) for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if hasattr(pipe, n)]
    assert encoders and all(e.dtype == torch.float32 for e in encoders)
    call = {"max_sequence_length": 32} if family == "sd3" else {}
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, **call).images[0]
    assert image.size == (64, 64)


@pytest.mark.slow
def test_flux2_build_runs_from_the_sd15_vae(tmp_path):
    """The FLUX.2 klein miniature's build: the sd15 miniature's VAE made a 32-channel ``AutoencoderKLFlux2`` (it
    decodes exactly what the sd15 VAE decodes; batch-norm statistics from the world's latents), and a few steps;
    the folder loads as a Flux2KleinPipeline and renders at its tokenizer's prompt length."""
    from diffusers import Flux2KleinPipeline

    from lora_studio.miniature import world
    from lora_studio.miniature.build_flux2 import flux2_vae_from
    from lora_studio.miniature.build_sd import _base_pipe
    from lora_studio.miniature.store import miniature_dir

    record = build("flux2", tmp_path / "flux2", scale=SCALE, threads=1)
    assert record["recipe"]["steps"] == 6 and record["recipe"]["seed"] == 1700
    pipe = Flux2KleinPipeline.from_pretrained(tmp_path / "flux2")
    assert pipe.vae.config.latent_channels == 32 and pipe.transformer.config.in_channels == 128
    assert pipe.tokenizer.model_max_length == 32 and pipe.text_encoder.dtype == torch.float32
    assert not pipe.config.is_distilled
    image = pipe(prompt="a red circle", num_inference_steps=2, height=64, width=64, max_sequence_length=32).images[0]
    assert image.size == (64, 64)

    sd_vae = _base_pipe(miniature_dir("sd15")).vae
    x = torch.from_numpy(world.pixels(world.world_scenes(4, seed=5)))
    vae = flux2_vae_from(sd_vae, x, seed=1)
    assert vae.bn.running_var.min() > 1e-3 and vae.bn.running_mean.abs().max() > 1e-3
    with torch.no_grad():
        expected = sd_vae.decode(sd_vae.encode(x).latent_dist.mean).sample
        got = vae.decode(vae.encode(x).latent_dist.mean).sample
    assert (got - expected).abs().max() < 1e-3


@pytest.mark.slow
def test_qwen_image_build_runs_with_its_own_causal_vae(tmp_path):
    """The Qwen-Image miniature's build: its causal 3-D VAE trained from scratch through one-frame 2-D convolutions
    (exact: the same pictures as the 3-D ones), a few flow-matching steps; the folder loads as a QwenImagePipeline
    whose tokenizer leaves the template's 34 tokens for the pipeline to drop, and renders with true guidance."""
    import inspect

    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d

    from lora_studio.miniature import world
    from lora_studio.miniature.build_qwen_image import one_frame_convolutions
    from lora_studio.models.tiny_qwen_image import check_template

    record = build("qwen_image", tmp_path / "qwen_image", scale=SCALE, threads=1)
    assert record["recipe"]["steps"] == 6 and record["recipe"]["vae_steps"] == 6 and record["recipe"]["seed"] == 1800
    pipe = QwenImagePipeline.from_pretrained(tmp_path / "qwen_image")
    assert pipe.vae_scale_factor == 4 and pipe.vae.config.z_dim == 16 and pipe.transformer.config.in_channels == 64
    released = inspect.signature(AutoencoderKLQwenImage).parameters["latents_std"].default
    assert len(pipe.vae.config.latents_std) == 16 and pipe.vae.config.latents_std != released  # the world's
    assert pipe.text_encoder.dtype == torch.float32
    check_template(pipe.tokenizer)
    for conv in pipe.vae.modules():
        if isinstance(conv, QwenImageCausalConv3d):
            assert not conv.weight[:, :, :-1].any(), "only the last slice in time is trained"
    vae = pipe.vae.float()
    x = torch.from_numpy(world.pixels(world.world_scenes(2, seed=5))).unsqueeze(2)
    with torch.no_grad():
        expected = vae.decode(vae.encode(x).latent_dist.mean).sample
        with one_frame_convolutions():
            got = vae.decode(vae.encode(x).latent_dist.mean).sample
    assert (got - expected).abs().max() < 1e-4
    image = pipe(prompt="a red circle", negative_prompt=" ", true_cfg_scale=2.0, num_inference_steps=2, height=64,
                 width=64).images[0]
    assert image.size == (64, 64)
