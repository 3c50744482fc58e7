"""Qwen-Image LoRAs on the tiny offline pipeline: train, export, reload with every layer placed, strength 0 = base,
exact resume, detection from a folder and a single file, the text conditioning and latent normalisation.

The exported file is loaded the way a user's diffusers script loads it (``load_lora_weights`` on a fresh
``QwenImagePipeline``) and the layers that really got the adapter are counted: diffusers drops keys it does not
recognise without a word (a ``transformer.`` prefix with alphas, for instance, places nothing in this family).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_studio.config import TrainConfig
from lora_studio.training.run_folder import RunFolder
from helpers import assert_reloads_in_diffusers, run_job, stop_then_resume


@pytest.fixture(scope="session")
def tiny_qwen_image(tmp_path_factory) -> Path:
    from lora_studio.models.tiny_qwen_image import build_tiny_qwen_image

    return build_tiny_qwen_image(tmp_path_factory.mktemp("models") / "tiny-qwen-image")


def qwen_config(model: Path, data: Path, out: Path, **changes) -> TrainConfig:
    values = dict(base_model=str(model), train_data_dir=str(data), output_dir=str(out), resolution=64, lora_rank=4,
                  learning_rate=5e-2, batch_size=2, max_train_steps=4, save_steps=0, seed=3, max_sequence_length=32)
    values.update(changes)
    return TrainConfig(**values).validate()


@pytest.mark.slow
def test_qwen_image_lora_trains_exports_and_every_layer_is_placed(tiny_qwen_image, demo_images, tmp_path):
    from diffusers import QwenImagePipeline
    from safetensors import safe_open

    from lora_studio.export.diffusers_format import module_of

    job = run_job(qwen_config(tiny_qwen_image, demo_images, tmp_path / "out", lora_targets="all_linear",
                              train_double_block_indices="1"))
    assert job.status == "finished", job.error
    log = job.snapshot().log
    passed = [line for line in log if "Export check passed" in line]
    assert passed and "strength 0 vs base 0" in passed[0], log
    assert float(passed[0].split("within ")[1].split(" ")[0]) < 1e-3

    lora = job.run.path / "my_lora.safetensors"
    with safe_open(str(lora), "pt") as fh:
        keys, meta = list(fh.keys()), fh.metadata()
    modules = sorted({module_of(k) for k in keys if not k.endswith(".alpha")})
    # ComfyUI's generic "diffusion_model.<name>" form, alphas beside every module
    assert all(k.startswith("diffusion_model.transformer_blocks.1.") for k in keys)
    assert sorted(k[:-len(".alpha")] for k in keys if k.endswith(".alpha")) == modules
    assert len(modules) == 12  # all_linear: 8 attention layers + 4 feed-forward layers, block 1 only
    assert meta["ss_base_model_version"] == "qwen_image" and meta["modelspec.architecture"] == "qwen-image/lora"
    assert meta["ss_steps"] == "4" and meta["ss_network_dim"] == "4" and "ss_guidance_scale" not in meta

    assert_reloads_in_diffusers(QwenImagePipeline.from_pretrained(tiny_qwen_image), lora, len(modules))


@pytest.mark.slow
def test_qwen_image_resume_after_stop_gives_the_same_losses(tiny_qwen_image, demo_images, tmp_path):
    steps = 4
    common = dict(max_train_steps=steps, save_steps=2, verify_export=False, timestep_sampling="flux_shift",
                  caption_dropout_rate=0.3)
    full = run_job(qwen_config(tiny_qwen_image, demo_images, tmp_path / "a", **common))
    assert full.status == "finished", full.error
    full_losses = [loss for _, loss in full.snapshot().losses]
    resumed = stop_then_resume(qwen_config(tiny_qwen_image, demo_images, tmp_path / "b", **common), stop_at=3)
    metrics = RunFolder(resumed.run.path).read_metrics()
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert [m["loss"] for m in metrics] == pytest.approx(full_losses, rel=1e-5, abs=1e-6)


def test_text_drops_the_template_and_latents_are_normalised(tiny_qwen_image, demo_images, tmp_path):
    from diffusers import QwenImagePipeline

    from lora_studio.training.events import EventBus
    from lora_studio.training.qwen_image import QwenImageTrainer, QwenLatents

    cfg = qwen_config(tiny_qwen_image, demo_images, tmp_path / "out")
    trainer = QwenImageTrainer(cfg, RunFolder.create(cfg), EventBus())
    trainer.pipe = QwenImagePipeline.from_pretrained(tiny_qwen_image, transformer=None)
    captions = ["a red circle", "a blue square on a dark background with a cat"]
    cond = trainer.encode_text(captions)
    lengths = [len(trainer.pipe.tokenizer(c + "<|im_end|>\n<|im_start|>assistant\n").input_ids) for c in captions]
    assert cond["prompt_embeds_mask"].sum(1).tolist() == lengths  # the caption and the template's end, no system part
    # cached one by one, a batch of both is padded to the longer one with its mask zero there
    trainer.text_cache = {c: {k: v[i, :lengths[i]] for k, v in cond.items()} for i, c in enumerate(captions)}
    batch = trainer.text_conditioning(captions)
    assert batch["prompt_embeds"].shape[1] == max(lengths) and batch["prompt_embeds_mask"][0, lengths[0]:].sum() == 0

    vae = trainer.pipe.vae
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    raw = vae.encode(pixels.unsqueeze(2)).latent_dist.mean[:, :, 0]
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
    normalised = QwenLatents(vae).encode(pixels).latent_dist.mean
    assert normalised.shape == (1, 16, 8, 8)
    assert torch.allclose(normalised * std + mean, raw, atol=1e-5)  # what the pipeline undoes before decoding


def test_qwen_image_prediction_is_the_pipelines_velocity(tiny_qwen_image, tmp_path):
    """The trainer's predict (packed latents, the cached text with its mask, the token grid) gives exactly what the
    pipeline steps its scheduler with, for two prompts of different lengths in one batch."""
    from diffusers import QwenImagePipeline

    from lora_studio.training.events import EventBus
    from lora_studio.training.qwen_image import QwenImageTrainer

    pipe = QwenImagePipeline.from_pretrained(tiny_qwen_image)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    step = pipe.scheduler.step
    pipe.scheduler.step = lambda out, t, latents, **kw: (seen.append((out, t, latents)), step(out, t, latents, **kw))[1]
    prompts = ["a red circle", "a green square on a dark background, photo"]
    pipe(list(prompts), num_inference_steps=2, height=64, width=64, output_type="latent",
         generator=torch.Generator().manual_seed(0), max_sequence_length=32)
    cfg = qwen_config(tiny_qwen_image, tmp_path, tmp_path / "out")
    trainer = QwenImageTrainer(cfg, RunFolder.create(cfg), EventBus())
    trainer.pipe = pipe
    out, t, packed = seen[1]
    latents = QwenImagePipeline._unpack_latents(packed, 64, 64, 8)[:, :, 0]
    with torch.no_grad():
        mine = trainer.predict(latents, (t / 1000).expand(2), trainer.encode_text(prompts))
    assert torch.allclose(QwenImagePipeline._pack_latents(mine, 2, 16, 8, 8), out, atol=1e-5)


def test_qwen_image_detected_from_folder_and_single_file(tiny_qwen_image, tmp_path):
    from diffusers import QwenImageTransformer2DModel
    from safetensors.torch import save_file

    from lora_studio.families import get_family
    from lora_studio.models.detect import detect_family, family_info
    from lora_studio.models.flow_loading import load_flow_pipeline

    assert detect_family(str(tiny_qwen_image)) == "qwen_image"
    assert family_info(str(tiny_qwen_image)).prediction_type == "flow_matching"
    transformer = QwenImageTransformer2DModel.from_pretrained(tiny_qwen_image / "transformer")
    single = tmp_path / "qwen_image_tiny.safetensors"  # as ComfyUI's diffusion_models files: diffusers' names
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in transformer.state_dict().items()},
              str(single))
    assert detect_family(str(single)) == "qwen_image"
    lora_like = tmp_path / "lora.safetensors"
    save_file({"diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
               "diffusion_model.img_in.lora_A.weight": torch.zeros(4, 64),
               "diffusion_model.txt_norm.lora_A.weight": torch.zeros(4, 32)}, str(lora_like))
    assert not get_family("qwen_image").matches_keys(set(__import__("safetensors").safe_open(
        str(lora_like), "pt").keys()))
    pipe = load_flow_pipeline(str(single), "qwen_image", single_file_config=str(tiny_qwen_image))
    assert torch.equal(pipe.transformer.state_dict()["img_in.weight"], transformer.state_dict()["img_in.weight"])


def test_testing_tab_renders_with_true_cfg(tiny_qwen_image, monkeypatch):
    from lora_studio.inference import grid

    assert grid.model_render_defaults(str(tiny_qwen_image)) == {"steps": 50, "cfg": 4.0}
    seen = {}

    class Pipe:
        def __call__(self, prompt, **kwargs):
            seen.update(kwargs)
            return type("Out", (), {"images": ["image"]})()

    Pipe.__name__ = "QwenImagePipeline"
    Pipe.default_sample_size, Pipe.vae_scale_factor, Pipe.unet = 8, 8, None
    grid.render_one(Pipe(), grid.RenderSettings(prompt="a sign", steps=2, cfg=4.0), None, 0)
    assert seen["true_cfg_scale"] == 4.0 and seen["negative_prompt"].strip() == "" and "guidance_scale" not in seen


def test_qwen_image_presets_fit_their_budget_and_12gb_swaps_blocks():
    from lora_studio.presets import list_presets, recommend_preset
    from lora_studio.training.memory import estimate_breakdown, next_step_down

    presets = list_presets("qwen_image")
    assert [p.name for p in presets] == ["qwen_image_12gb", "qwen_image_16gb", "qwen_image_24gb"]
    for preset in presets:
        cfg = TrainConfig().replace(**preset.values).validate()
        est = estimate_breakdown(cfg, "qwen_image")
        assert est.total_gb <= 0.9 * preset.vram_gb, preset.name
        assert cfg.base_quantization == ("fp8" if preset.vram_gb == 12 else "nf4"), preset.name
        assert est.caching_gb < 3  # Qwen2.5-VL encodes on the CPU when it does not fit: not in the GPU peak
    twelve = TrainConfig().replace(**presets[0].values)
    assert (twelve.blocks_to_swap, twelve.resolution) == (45, 1024)
    assert estimate_breakdown(twelve.replace(blocks_to_swap=44), "qwen_image").total_gb > 0.9 * 12  # the fewest
    without_swap = TrainConfig().replace(**presets[1].values).replace(resolution=512, lora_rank=4)
    assert estimate_breakdown(without_swap, "qwen_image").total_gb > 0.9 * 12  # nf4 alone cannot fit 12 GB
    fp8 = TrainConfig().replace(**presets[2].values).replace(base_quantization="fp8")
    assert estimate_breakdown(fp8, "qwen_image").total_gb > 24  # fp8 needs a bigger card than 24 GB
    assert recommend_preset(24.0, "qwen_image").name == "qwen_image_24gb"
    assert next_step_down(fp8.replace(optimizer="adamw8bit"), "qwen_image").config.base_quantization == "nf4"


@pytest.mark.slow  # about 2 minutes: the 20B transformer's steps on the meta device
def test_qwen_image_estimate_covers_a_measured_step_of_the_full_size_transformer():
    import sys

    from lora_studio.training.memory import estimate_breakdown

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from qwen_z_memory import measure_qwen_step_peak

    cfg = TrainConfig(resolution=1024, gradient_checkpointing=True, mixed_precision="bf16", base_quantization="nf4",
                      max_sequence_length=128)
    peak = measure_qwen_step_peak(1024, 1, True, text_tokens=128)
    parts = estimate_breakdown(cfg, "qwen_image").parts
    assert parts["activations"] + parts["LoRA weights, gradients and optimizer"] >= peak.step_peak_bytes / 1e9


@pytest.mark.parametrize("mode", ["nf4", "int8", "fp8"])
@pytest.mark.slow
def test_quantized_qwen_image_base_trains_in_bf16_and_passes_the_export_check(mode, tiny_qwen_image, demo_images,
                                                                              tmp_path, monkeypatch):
    """bf16 over a quantized base, as on a GPU (nf4: bitsandbytes' CPU kernels): the fresh pipeline of the export
    check is quantized the same way."""
    monkeypatch.setenv("LORA_STUDIO_CPU_CHECK", "1")
    job = run_job(qwen_config(tiny_qwen_image, demo_images, tmp_path / "out", base_quantization=mode,
                              max_train_steps=2, mixed_precision="bf16"))
    assert job.status == "finished", job.error
    log = job.snapshot().log
    assert any(f"weights bfloat16, base {mode}" in line for line in log), log
    assert any("Export check passed" in line and "strength 0 vs base 0" in line for line in log), log


@pytest.mark.parametrize(("repo", "pipeline", "family"), [("Qwen/Qwen-Image", "QwenImagePipeline", "qwen_image"),
                                                          ("Tongyi-MAI/Z-Image-Turbo", "ZImagePipeline", "z_image")])
def test_hub_ids_are_detected_from_their_model_index(repo, pipeline, family, tmp_path, monkeypatch):
    """A hub id is told by its model_index.json (read here from the local hub cache, as after a first download)."""
    import json

    import huggingface_hub.constants

    from lora_studio.models.detect import detect_family

    folder = tmp_path / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text(json.dumps({"_class_name": pipeline, "transformer": ["diffusers", "x"]}))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert detect_family(repo) == family


def test_text_encoder_encodes_on_the_cpu_when_it_does_not_fit_the_gpu(tiny_qwen_image, tmp_path, monkeypatch):
    """Qwen2.5-VL-7B is 16.6 GB in bf16: on a card without that much free memory the captions are encoded on the
    CPU (decided once, said in the log); with room, on the GPU."""
    from types import SimpleNamespace

    from diffusers import QwenImagePipeline

    from lora_studio.training.events import EventBus
    from lora_studio.training.qwen_image import QwenImageTrainer

    cfg = qwen_config(tiny_qwen_image, tmp_path, tmp_path / "out")
    said = []
    for free, expected in ((10**3, "cpu"), (10**12, "cuda")):
        trainer = QwenImageTrainer(cfg, RunFolder.create(cfg), EventBus())
        trainer.pipe = QwenImagePipeline.from_pretrained(tiny_qwen_image, transformer=None)
        trainer.accelerator = SimpleNamespace(device=torch.device("cuda"))
        trainer.say = lambda text, level="info": said.append(text)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 10**12))
        assert trainer.text_device().type == expected
        assert trainer.text_device().type == expected  # decided once
    assert len([s for s in said if "encoded on the CPU" in s]) == 1


def test_the_demo_offers_the_qwen_image_miniature(tmp_path):
    """``--demo`` offers the Qwen-Image miniature (a copy of the committed one) beside its other models."""
    from lora_studio.models.detect import detect_family
    from lora_studio.ui.context import StudioContext
    from lora_studio.ui.demo import build_demo

    assets = build_demo(tmp_path / "demo")
    assert detect_family(str(assets.qwen_image_model)) == "qwen_image"
    assert "qwen_image" in assets.miniatures and assets.qwen_image_model.name == "miniature-qwen_image"
    context = StudioContext(outputs=tmp_path / "outputs", models_dir=tmp_path / "models", demo=assets)
    assert str(assets.qwen_image_model) in context.model_choices()


def test_training_tab_says_when_no_qwen_image_preset_fits_the_gpu(tiny_qwen_image):
    from lora_studio.ui.train_family import family_choices

    small = family_choices(str(tiny_qwen_image), gpu_gb=7.8)
    assert small.family == "qwen_image" and "No preset of this family fits this GPU's 8 GB" in small.text
    assert family_choices(str(tiny_qwen_image), gpu_gb=11.8).preset == "qwen_image_12gb"
    big = family_choices(str(tiny_qwen_image), gpu_gb=23.6)
    assert big.preset == "qwen_image_24gb" and "Recommended preset for this GPU: `qwen_image_24gb`" in big.text
