"""FLUX.2 LoRAs on the tiny offline pipelines. klein: train, export, reload with every layer placed, strength 0 =
base, exact resume, latent normalisation, detection from a folder and from a single file's tensor names. dev
(``Flux2Pipeline``, Mistral 3, guidance-distilled): train, export and reload into a fresh ``Flux2Pipeline``, the cached
Mistral layers 10/20/30, the guidance input, render defaults, exact resume, and the released folder layout (a
``PixtralProcessor`` tokenizer) loading without torchvision.

The exported file is loaded as a user's diffusers script loads it (``load_lora_weights`` on a fresh pipeline) and
the layers that really got the adapter are counted; every module must also be in ComfyUI's FLUX table (which holds
FLUX.2's layers).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lora_studio.config import TrainConfig
from lora_studio.training.run_folder import RunFolder
from helpers import assert_reloads_in_diffusers, exported_file, flow_config, run_job, stop_then_resume


@pytest.fixture(scope="session")
def tiny_klein(tmp_path_factory) -> Path:
    from lora_studio.models.tiny_flux2 import build_tiny_flux2_klein

    return build_tiny_flux2_klein(tmp_path_factory.mktemp("models") / "tiny-klein")


def klein_config(model: Path, data: Path, out: Path, **changes) -> TrainConfig:
    return flow_config(model, data, out, **{"lora_alpha": 8.0, **changes})


@pytest.mark.slow  # 40-90 s on 2 busy cores: the 28-layer text encoder's per-call cost in 10 renders
def test_klein_lora_trains_exports_and_every_layer_is_placed(tiny_klein, demo_images, tmp_path):
    from diffusers import Flux2KleinPipeline

    from lora_studio.export.diffusers_format import module_of
    from lora_studio.export.flux_lora import comfy_maps

    job = run_job(klein_config(tiny_klein, demo_images, tmp_path / "out", sample_prompt="a red circle",
                               sample_steps=3))
    keys, meta = exported_file(job)
    assert (job.run.samples_dir / "step_000003.png").is_file()
    lora = job.run.path / "my_lora.safetensors"
    modules = sorted({module_of(k) for k in keys})
    assert all(k.startswith("transformer.") and ".lora_" in k for k in keys)  # no alpha: diffusers refuses it
    assert len(modules) == 8 + 1  # the double block's 8 attention layers, the single block's fused projection
    assert all(comfy_maps(m.removeprefix("transformer.")) for m in modules)
    assert meta["ss_base_model_version"] == "flux2" and meta["lora_studio_trained_alpha"] == "8.0"

    assert_reloads_in_diffusers(Flux2KleinPipeline.from_pretrained(tiny_klein), lora, len(modules), "a red circle")


@pytest.mark.slow
def test_klein_all_linear_file_reloads_with_every_layer_and_strength_0_is_the_base(tiny_klein, demo_images,
                                                                                    tmp_path):
    from diffusers import Flux2KleinPipeline
    from safetensors import safe_open

    from lora_studio.export.diffusers_format import module_of
    from lora_studio.export.verify import count_placed

    job = run_job(klein_config(tiny_klein, demo_images, tmp_path / "out", lora_targets="all_linear",
                               max_train_steps=2, verify_export=False))
    assert job.status == "finished", job.error
    lora = job.run.path / "my_lora.safetensors"
    with safe_open(str(lora), "pt") as fh:
        modules = {module_of(k) for k in fh.keys()}
    assert "transformer.transformer_blocks.0.ff_context.linear_out" in modules
    assert "transformer.single_transformer_blocks.0.attn.to_out" in modules and len(modules) == 8 + 4 + 2

    pipe = Flux2KleinPipeline.from_pretrained(tiny_klein)
    model = pipe.transformer
    gen = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 128, generator=gen), timestep=torch.tensor([0.5]),
                  encoder_hidden_states=torch.randn(1, 8, 48, generator=gen),
                  img_ids=torch.cartesian_prod(torch.arange(1), torch.arange(4), torch.arange(4), torch.arange(1))[None],
                  txt_ids=torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(8))[None],
                  return_dict=False)
    with torch.no_grad():
        base = model(**inputs)[0]
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="mine")
        assert count_placed(model, "mine") == len(modules)
        pipe.set_adapters(["mine"], adapter_weights=[0.0])
        assert torch.equal(model(**inputs)[0], base)
        pipe.set_adapters(["mine"], adapter_weights=[1.0])
        assert (model(**inputs)[0] - base).abs().max() > 1e-4

    # the Testing tab and `generate`: klein's pipeline (an input image first, no negative prompt) through the grid
    from lora_studio.inference.grid import PipelineCache, RenderSettings, render_strengths

    settings = RenderSettings(prompt="a red circle", negative="ignored", seed=1, steps=2, cfg=1.0, width=64, height=64)
    zero, one = render_strengths(str(tiny_klein), lora, settings, (0.0, 1.0), cache=PipelineCache())
    assert np.asarray(zero).shape == (64, 64, 3) and np.abs(np.asarray(one, float) - np.asarray(zero, float)).max() > 0


@pytest.mark.slow
def test_klein_resume_after_stop_gives_the_same_losses(tiny_klein, demo_images, tmp_path):
    steps = 4
    full = run_job(klein_config(tiny_klein, demo_images, tmp_path / "a", max_train_steps=steps, save_steps=2,
                                verify_export=False))
    assert full.status == "finished", full.error
    full_losses = [loss for _, loss in full.snapshot().losses]
    cfg = klein_config(tiny_klein, demo_images, tmp_path / "b", max_train_steps=steps, save_steps=2,
                       verify_export=False)
    resumed = stop_then_resume(cfg, stop_at=2)
    metrics = RunFolder(resumed.run.path).read_metrics()
    assert [m["loss"] for m in metrics] == pytest.approx(full_losses, rel=1e-5, abs=1e-6)


def test_klein_latents_are_normalised_as_the_pipeline_normalises_them(tiny_klein, demo_images, tmp_path):
    from diffusers import Flux2KleinPipeline

    from lora_studio.training.events import EventBus
    from lora_studio.training.flux2 import Flux2Trainer, patchify

    cfg = klein_config(tiny_klein, demo_images, tmp_path / "out")
    trainer = Flux2Trainer(cfg, RunFolder.create(cfg), EventBus())
    trainer.pipe = Flux2KleinPipeline.from_pretrained(tiny_klein)
    raw = torch.randn(2, 32, 8, 8)
    vae = trainer.pipe.vae
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    expected = (patchify(raw) - mean) / std  # the pipeline's _encode_vae_image
    assert torch.allclose(patchify(trainer.normalize_latents(raw)), expected, atol=1e-5)
    assert not torch.allclose(patchify(raw), expected, atol=1e-2)  # the tiny VAE's statistics are not trivial


def test_flux2_is_detected_from_a_folder_and_a_single_files_names(tiny_klein, tmp_path):
    from safetensors.torch import save_file

    from lora_studio.families import get_family
    from lora_studio.models.detect import detect_family

    assert detect_family(str(tiny_klein)) == "flux2"
    assert get_family("flux2").render_settings(str(tiny_klein)) == {"steps": 50, "cfg": 4.0}  # a base model
    single = tmp_path / "flux-2-klein-base-4b.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2),
               "double_stream_modulation_img.lin.weight": torch.zeros(2, 2)}, str(single))
    assert detect_family(str(single)) == "flux2"
    flux1 = tmp_path / "flux1.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2),
               "double_blocks.0.img_mod.lin.weight": torch.zeros(2, 2)}, str(flux1))
    assert detect_family(str(flux1)) == "flux"


@pytest.mark.slow
def test_flux2_presets_fit_their_budget_by_estimate_and_the_estimate_covers_a_measured_step():
    import sys

    from lora_studio.presets import list_presets
    from lora_studio.training.memory import estimate_breakdown

    presets = [p for p in list_presets("flux2") if not p.variant]  # klein 4B's (test_flux2_variants: the others)
    assert [p.name for p in presets] == ["flux2_12gb", "flux2_16gb", "flux2_24gb"]
    for preset in presets:
        cfg = TrainConfig().replace(**preset.values)
        assert estimate_breakdown(cfg, "flux2").total_gb <= 0.9 * preset.vram_gb, preset.name
    twelve = TrainConfig().replace(**{**presets[0].values, "base_quantization": "none"})
    assert estimate_breakdown(twelve, "flux2").total_gb > 0.9 * 12  # why 12 GB stores the weights in fp8

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from flow_memory import KLEIN_4B, build, step_peak

    cfg = TrainConfig(resolution=512, gradient_checkpointing=True, mixed_precision="bf16")
    lora_weights = sum(p.numel() * 4 for p in build("flux2", KLEIN_4B).parameters() if p.requires_grad)
    measured = (step_peak("flux2", KLEIN_4B, 512, True) + lora_weights) / 1e9
    parts = estimate_breakdown(cfg, "flux2").parts
    estimated = parts["activations"] + parts["LoRA weights, gradients and optimizer"]
    assert measured <= estimated <= 1.5 * measured, (measured, estimated)


def test_klein_trains_from_a_single_file_in_bfl_layout(tiny_klein, demo_images, tmp_path):
    from diffusers import Flux2Transformer2DModel

    from lora_studio.models.detect import detect_family
    from lora_studio.models.flux2_loading import load_flux2_transformer
    from lora_studio.models.tiny_flux2 import save_flux2_single_file

    single = save_flux2_single_file(tiny_klein, tmp_path / "flux-2-klein-tiny.safetensors")
    assert detect_family(str(single)) == "flux2"
    loaded = load_flux2_transformer(str(single), single_file_config=str(tiny_klein)).state_dict()
    expected = Flux2Transformer2DModel.from_pretrained(tiny_klein / "transformer").state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)
    # the VAE, text encoder and configs from single_file_config (the export check: see the SD3.5 single-file test)
    job = run_job(klein_config(single, demo_images, tmp_path / "out", single_file_config=str(tiny_klein),
                               max_train_steps=1, verify_export=False))
    assert job.status == "finished", job.error


# --- FLUX.2 [dev]: Flux2Pipeline, Mistral 3 text encoder, guidance-distilled --------------------------------------
@pytest.fixture(scope="session")
def tiny_dev(tmp_path_factory) -> Path:
    from lora_studio.models.tiny_flux2 import build_tiny_flux2_dev

    return build_tiny_flux2_dev(tmp_path_factory.mktemp("models") / "tiny-dev")


@pytest.mark.slow  # 15-70 s on 2 busy cores: a 50-step sample, the grid's renders through 30 Mistral layers
def test_dev_trains_exports_and_reloads_into_a_fresh_flux2_pipeline(tiny_dev, demo_images, tmp_path):
    from diffusers import Flux2Pipeline

    from lora_studio.export.diffusers_format import module_of

    job = run_job(klein_config(tiny_dev, demo_images, tmp_path / "out", sample_prompt="a red circle", sample_steps=3))
    keys, meta = exported_file(job)  # the export check passed: strength 1 = trained, strength 0 = base
    assert (job.run.samples_dir / "step_000003.png").is_file()  # rendered with dev's 50 steps at guidance 4
    modules = sorted({module_of(k) for k in keys})
    assert len(modules) == 8 + 1 and all(k.startswith("transformer.") for k in keys)
    assert meta["modelspec.architecture"] == "flux-2-dev/lora" and meta["ss_base_model_version"] == "flux2"
    lora = job.run.path / "my_lora.safetensors"
    assert_reloads_in_diffusers(Flux2Pipeline.from_pretrained(tiny_dev), lora, len(modules), "a red circle")

    # the Testing tab and `generate`: dev's pipeline (no negative prompt, guidance embedded) through the grid
    from lora_studio.inference.grid import PipelineCache, RenderSettings, render_strengths

    settings = RenderSettings(prompt="a red circle", negative="ignored", seed=1, steps=2, cfg=4.0, width=64, height=64)
    zero, one = render_strengths(str(tiny_dev), lora, settings, (0.0, 1.0), cache=PipelineCache())
    assert np.asarray(zero).shape == (64, 64, 3) and np.abs(np.asarray(one, float) - np.asarray(zero, float)).max() > 0


def test_dev_caches_mistral_conditioning_and_feeds_the_guidance_input(tiny_dev, demo_images, tmp_path):
    from diffusers import Flux2Pipeline

    from lora_studio.training.events import EventBus
    from lora_studio.training.flux2 import Flux2Trainer

    def trainer_with(guidance: float) -> Flux2Trainer:
        cfg = klein_config(tiny_dev, demo_images, tmp_path / f"out{guidance}", guidance_scale=guidance)
        trainer = Flux2Trainer(cfg, RunFolder.create(cfg), EventBus())
        trainer.pipe = Flux2Pipeline.from_pretrained(tiny_dev)
        return trainer

    low, high = trainer_with(1.0), trainer_with(3.5)
    cond = low.encode_text(["a red circle", "a cat"])
    with torch.no_grad():  # Mistral's hidden layers 10, 20 and 30 stacked along the width, 32 tokens each
        outputs = low.pipe.text_encoder(**low.pipe.tokenizer.apply_chat_template(
            [[{"role": "system", "content": [{"type": "text", "text": low.pipe.system_message}]},
              {"role": "user", "content": [{"type": "text", "text": "a red circle"}]}]], tokenize=True,
            return_dict=True, return_tensors="pt", padding="max_length", truncation=True, max_length=32),
            output_hidden_states=True)
    expected = torch.cat([outputs.hidden_states[k][0] for k in (10, 20, 30)], dim=-1)
    assert cond["prompt_embeds"].shape == (2, 32, 48)
    assert torch.allclose(cond["prompt_embeds"][0], expected, atol=1e-5)
    gen = torch.Generator().manual_seed(0)
    noisy, sigmas = torch.randn(1, 32, 8, 8, generator=gen), torch.tensor([0.5])
    one = {"prompt_embeds": cond["prompt_embeds"][:1].detach()}
    with torch.no_grad():
        assert not torch.allclose(low.predict(noisy, sigmas, one), high.predict(noisy, sigmas, one), atol=1e-4)
        seen = {}
        handle = high.denoiser.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
        high.predict(noisy, sigmas, one)
        handle.remove()
    assert torch.equal(seen["guidance"], torch.tensor([3.5]))  # the guidance embedding gets guidance_scale


def test_dev_is_detected_renders_with_the_pipelines_defaults_and_resumes_exactly(tiny_dev, demo_images, tmp_path):
    import inspect

    from diffusers import Flux2Pipeline

    from lora_studio.families import get_family

    from lora_studio.models.detect import detect_family

    assert detect_family(str(tiny_dev)) == "flux2"
    call = inspect.signature(Flux2Pipeline.__call__).parameters
    expected = {"steps": call["num_inference_steps"].default, "cfg": call["guidance_scale"].default}
    assert get_family("flux2").render_settings(str(tiny_dev)) == expected == {"steps": 50, "cfg": 4.0}

    steps = 3
    full = run_job(klein_config(tiny_dev, demo_images, tmp_path / "a", max_train_steps=steps, save_steps=1,
                                verify_export=False, guidance_scale=3.5))
    assert full.status == "finished", full.error
    cfg = klein_config(tiny_dev, demo_images, tmp_path / "b", max_train_steps=steps, save_steps=1,
                       verify_export=False, guidance_scale=3.5)
    resumed = stop_then_resume(cfg, stop_at=1)
    losses = [m["loss"] for m in RunFolder(resumed.run.path).read_metrics()]
    assert losses == pytest.approx([loss for _, loss in full.snapshot().losses], rel=1e-5, abs=1e-6)


def _as_released_dev(tiny_dev: Path, folder: Path, template: str = "json") -> Path:
    """The tiny dev pipeline laid out as the released one: its tokenizer slot a ``PixtralProcessor`` (which
    transformers cannot build without torchvision), the chat template in the processor's ``chat_template.json``."""
    import json
    import shutil

    shutil.copytree(tiny_dev, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "tokenizer": ["transformers", "PixtralProcessor"]}))
    tok = folder / "tokenizer"
    (tok / "processor_config.json").write_text(json.dumps({"processor_class": "PixtralProcessor", "patch_size": 8,
                                                           "spatial_merge_size": 2}))
    jinja = tok / "chat_template.jinja"
    if template == "json":
        (tok / "chat_template.json").write_text(json.dumps({"chat_template": jinja.read_text()}))
    jinja.unlink()
    if template == "text-only":  # Mistral's template for plain-text messages: prints the pipeline's block lists
        jinja.write_text("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]"
                         "{{ m['content'] }}[/SYSTEM_PROMPT]{% else %}[INST]{{ m['content'] }}[/INST]{% endif %}"
                         "{% endfor %}")
    return folder


def test_dev_with_a_pixtral_processor_loads_and_trains_without_torchvision(tiny_dev, demo_images, tmp_path):
    from diffusers import Flux2Pipeline
    from transformers.utils import is_torchvision_available

    from lora_studio.errors import ModelLoadError
    from lora_studio.models.flux2_loading import load_flux2_pipeline

    if is_torchvision_available():
        pytest.skip("torchvision is installed: the pipeline builds its PixtralProcessor itself")
    released = _as_released_dev(tiny_dev, tmp_path / "released")
    pipe = load_flux2_pipeline(str(released))
    expected, _ = Flux2Pipeline.from_pretrained(tiny_dev).encode_prompt("a red circle", max_sequence_length=32)
    assert torch.equal(pipe.encode_prompt("a red circle", max_sequence_length=32)[0], expected)
    job = run_job(klein_config(released, demo_images, tmp_path / "out", max_train_steps=1))
    assert job.status == "finished", job.error
    assert any("Export check passed" in line for line in job.snapshot().log)
    card = (job.run.path / "README.md").read_text()
    assert "Flux2Pipeline.from_pretrained" in card and "Flux2KleinPipeline" not in card  # dev's own pipeline

    for template in ("none", "text-only"):
        with pytest.raises(ModelLoadError, match="needs torchvision"):
            load_flux2_pipeline(str(_as_released_dev(tiny_dev, tmp_path / template, template=template)))
