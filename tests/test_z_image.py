"""Z-Image LoRAs on the tiny offline pipeline: train, export, reload with every layer placed, strength 0 = base,
exact resume, the trainer's prediction equal to the pipeline's own, detection from a folder and a single file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_studio.config import TrainConfig
from lora_studio.training.run_folder import RunFolder
from helpers import assert_reloads_in_diffusers, run_job, stop_then_resume
from test_qwen_image import tiny_qwen_image  # noqa: F401  (fixture)


@pytest.fixture(scope="session")
def tiny_z_image(tmp_path_factory) -> Path:
    from lora_studio.models.tiny_z_image import build_tiny_z_image

    return build_tiny_z_image(tmp_path_factory.mktemp("models") / "tiny-z-image")


def z_config(model: Path, data: Path, out: Path, **changes) -> TrainConfig:
    values = dict(base_model=str(model), train_data_dir=str(data), output_dir=str(out), resolution=64, lora_rank=4,
                  learning_rate=2e-2, batch_size=2, max_train_steps=3, save_steps=0, seed=3, max_sequence_length=32,
                  timestep_sampling="shift")
    values.update(changes)
    return TrainConfig(**values).validate()


@pytest.mark.slow
def test_z_image_lora_trains_exports_and_every_layer_is_placed(tiny_z_image, demo_images, tmp_path):
    from diffusers import ZImagePipeline
    from safetensors import safe_open

    from lora_studio.export.diffusers_format import module_of
    from lora_studio.training.z_image import comfy_maps_z_image

    job = run_job(z_config(tiny_z_image, demo_images, tmp_path / "out", lora_targets="all_linear"))
    assert job.status == "finished", job.error
    passed = [line for line in job.snapshot().log if "Export check passed" in line]
    assert passed and "strength 0 vs base 0" in passed[0], job.snapshot().log
    assert float(passed[0].split("within ")[1].split(" ")[0]) < 1e-3

    lora = job.run.path / "my_lora.safetensors"
    with safe_open(str(lora), "pt") as fh:
        keys, meta = list(fh.keys()), fh.metadata()
    modules = sorted({module_of(k) for k in keys if not k.endswith(".alpha")})
    assert all(k.startswith("diffusion_model.layers.") for k in keys)
    assert len(modules) == 2 * 7  # all_linear: q, k, v, out and w1, w2, w3 in each of the 2 main layers
    assert all(comfy_maps_z_image(m.removeprefix("diffusion_model.")) for m in modules)
    assert meta["ss_base_model_version"] == "z_image" and meta["ss_network_module"] == "networks.lora_z_image"

    assert_reloads_in_diffusers(ZImagePipeline.from_pretrained(tiny_z_image), lora, len(modules))


@pytest.mark.slow
def test_z_image_resume_after_stop_gives_the_same_losses(tiny_z_image, demo_images, tmp_path):
    common = dict(max_train_steps=4, save_steps=2, verify_export=False)
    full = run_job(z_config(tiny_z_image, demo_images, tmp_path / "a", **common))
    assert full.status == "finished", full.error
    full_losses = [loss for _, loss in full.snapshot().losses]
    resumed = stop_then_resume(z_config(tiny_z_image, demo_images, tmp_path / "b", **common), stop_at=3)
    metrics = RunFolder(resumed.run.path).read_metrics()
    assert [m["loss"] for m in metrics] == pytest.approx(full_losses, rel=1e-5, abs=1e-6)


def test_z_image_prediction_is_the_pipelines_velocity(tiny_z_image, tmp_path):
    """The trainer's predict (list of one-frame latents, time 1 - sigma, the prompt's own length, the output negated)
    gives exactly what the pipeline steps its scheduler with."""
    from diffusers import ZImagePipeline

    from lora_studio.training.events import EventBus
    from lora_studio.training.z_image import ZImageTrainer

    pipe = ZImagePipeline.from_pretrained(tiny_z_image)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    step = pipe.scheduler.step
    pipe.scheduler.step = lambda out, t, latents, **kw: (seen.append((out, t, latents)), step(out, t, latents, **kw))[1]
    prompts = ["a red circle", "a green square on a dark background, photo"]
    # (a copy: the pipeline writes its chat template into the list it is given)
    pipe(list(prompts), num_inference_steps=2, height=64, width=64, guidance_scale=0.0, output_type="latent",
         generator=torch.Generator().manual_seed(0), max_sequence_length=32)
    cfg = z_config(tiny_z_image, tmp_path, tmp_path / "out")
    trainer = ZImageTrainer(cfg, RunFolder.create(cfg), EventBus())
    trainer.pipe = pipe
    out, t, latents = seen[1]
    with torch.no_grad():
        mine = trainer.predict(latents, (t / 1000).expand(2), trainer.encode_text(prompts))
    assert torch.allclose(mine, out, atol=1e-5)


def _original_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers Z-Image transformer state in the original (ComfyUI) layout: fused qkv, the old names."""
    out = {}
    for key, value in state.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            parts = [state[key.replace(".to_q.", f".to_{x}.")] for x in "qkv"]
            key, value = key.replace(".to_q.", ".qkv."), torch.cat(parts)
        for new, old in ((".attention.to_out.0.", ".attention.out."), (".attention.norm_q.", ".attention.q_norm."),
                         (".attention.norm_k.", ".attention.k_norm."), ("all_final_layer.2-1.", "final_layer."),
                         ("all_x_embedder.2-1.", "x_embedder.")):
            key = key.replace(new, old)
        out[f"model.diffusion_model.{key}"] = value.contiguous()
    return out


def test_z_image_detected_from_folder_and_single_file(tiny_z_image, tmp_path):
    from diffusers import ZImageTransformer2DModel
    from safetensors.torch import save_file

    from lora_studio.models.detect import detect_family
    from lora_studio.models.flow_loading import load_flow_pipeline

    assert detect_family(str(tiny_z_image)) == "z_image"
    transformer = ZImageTransformer2DModel.from_pretrained(tiny_z_image / "transformer")
    single = tmp_path / "z_image_tiny.safetensors"
    save_file(_original_layout(transformer.state_dict()), str(single))
    assert detect_family(str(single)) == "z_image"
    pipe = load_flow_pipeline(str(single), "z_image", single_file_config=str(tiny_z_image))
    for key, value in transformer.state_dict().items():
        assert torch.equal(pipe.transformer.state_dict()[key], value), key


def test_z_image_render_defaults_tell_turbo_from_base(tiny_z_image, tmp_path):
    from lora_studio.families import get_family

    family = get_family("z_image")
    assert family.render_settings(str(tiny_z_image)) == {"steps": 9, "cfg": 0.0}
    assert family.render_settings("Tongyi-MAI/Z-Image-Turbo") == {"steps": 9, "cfg": 0.0}
    assert family.render_settings("Tongyi-MAI/Z-Image") == {"steps": 28, "cfg": 4.0}
    assert family.render_settings(str(tmp_path / "z_image_base")) == {"steps": 28, "cfg": 4.0}


def test_z_image_presets_fit_their_budget():
    from lora_studio.presets import list_presets
    from lora_studio.training.memory import estimate_breakdown

    presets = list_presets("z_image")
    assert [p.name for p in presets] == ["z_image_12gb", "z_image_16gb", "z_image_24gb"]
    for preset in presets:
        cfg = TrainConfig().replace(**preset.values)
        assert estimate_breakdown(cfg, "z_image").total_gb <= 0.9 * preset.vram_gb, preset.name
        assert cfg.resolution == 1024 and cfg.timestep_sampling == "shift" and cfg.discrete_flow_shift == 3.0


@pytest.mark.parametrize("kind", ["dora", "lokr", "loha"])
@pytest.mark.slow
def test_z_image_network_types_export_and_reload(kind, tiny_z_image, demo_images, tmp_path):
    """DoRA, LoKr and LoHa keep the diffusion_model.* key map with their LyCORIS tensors; the export check loads them
    through PEFT as ComfyUI applies them."""
    from safetensors import safe_open

    job = run_job(z_config(tiny_z_image, demo_images, tmp_path / "out", network_type=kind, max_train_steps=2))
    assert job.status == "finished", job.error
    assert any("Export check passed" in line for line in job.snapshot().log)
    with safe_open(str(job.run.path / "my_lora.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    suffix = {"dora": ".dora_scale", "lokr": ".lokr_w1", "loha": ".hada_w1_a"}[kind]
    assert all(k.startswith("diffusion_model.layers.") for k in keys) and any(k.endswith(suffix) for k in keys)


@pytest.mark.slow
def test_z_image_renders_in_the_testing_tab(tiny_z_image):
    """The Testing tab / generate path: the pipeline from the registry's loader, its native size (ZImagePipeline
    has no default_sample_size: 1024 px), a picture at the grid's settings."""
    from lora_studio.inference import grid

    cache = grid.PipelineCache()
    pipe = cache.pipeline(str(tiny_z_image))
    assert cache.family == "z_image" and grid.native_size(pipe) == 1024
    image = grid.render_one(pipe, grid.RenderSettings(prompt="a red circle", steps=2, cfg=0.0, width=64, height=64),
                            None, 0)
    assert image.size == (64, 64)


@pytest.mark.parametrize("mode", ["nf4", "int8", "fp8"])
@pytest.mark.slow
def test_quantized_z_image_base_trains_in_bf16_and_passes_the_export_check(mode, tiny_z_image, demo_images, tmp_path,
                                                                           monkeypatch):
    """(Its timestep embedder casts its input to its weights' dtype, so it stays bf16: quantize.KEEP.)"""
    monkeypatch.setenv("LORA_STUDIO_CPU_CHECK", "1")  # bf16 on the CPU, as a GPU run holds it; nf4: bnb's CPU kernels
    job = run_job(z_config(tiny_z_image, demo_images, tmp_path / "out", base_quantization=mode, max_train_steps=2,
                           mixed_precision="bf16"))
    assert job.status == "finished", job.error
    log = job.snapshot().log
    assert any(f"weights bfloat16, base {mode}" in line for line in log), log
    assert any("Export check passed" in line and "strength 0 vs base 0" in line for line in log), log


def test_qwen_image_and_z_image_rules_say_yes_for_their_own_family_only(tiny_z_image, tiny_qwen_image):  # noqa: F811
    import json

    from diffusers import QwenImageTransformer2DModel, ZImageTransformer2DModel

    from lora_studio.families import FAMILIES

    def by_index(folder) -> list[str]:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        return [f.id for f in FAMILIES.values() if f.matches_index and f.matches_index(index, folder)]

    def by_keys(keys) -> list[str]:
        return [f.id for f in FAMILIES.values() if f.matches_keys and f.matches_keys(set(keys))]

    assert by_index(tiny_qwen_image) == ["qwen_image"] and by_index(tiny_z_image) == ["z_image"]
    qwen = QwenImageTransformer2DModel.from_pretrained(tiny_qwen_image / "transformer").state_dict()
    z = _original_layout(ZImageTransformer2DModel.from_pretrained(tiny_z_image / "transformer").state_dict())
    assert by_keys(qwen) == ["qwen_image"] and by_keys(z) == ["z_image"]
    assert by_keys([k.removeprefix("model.") for k in z]) == ["z_image"]  # "diffusion_model." prefix
    assert by_keys([f"diffusion_model.{k[:-len('.weight')]}.lora_A.weight" for k in qwen if k.endswith(".weight")]) == []
    assert by_keys(["double_blocks.0.img_attn.qkv.weight", "time_in.in_layer.weight"]) == ["flux"]


def _presets(family: str) -> list[str]:
    from lora_studio.presets import list_presets

    return [p.name for p in list_presets(family)]


@pytest.mark.slow  # five runs with the export check: about 30 s
@pytest.mark.parametrize("name", _presets("qwen_image") + _presets("z_image"))
def test_every_qwen_image_and_z_image_preset_runs_as_set(name, tiny_qwen_image, tiny_z_image, demo_images,  # noqa: F811
                                                          tmp_path, monkeypatch):
    """The preset's own settings (quantized base, bf16, 8-bit AdamW, gradient checkpointing, its timestep
    sampling) on the tiny model and small shapes, as a GPU would run them."""
    from lora_studio.presets import get_preset

    monkeypatch.setenv("LORA_STUDIO_CPU_CHECK", "1")
    preset = get_preset(name)
    model = tiny_qwen_image if preset.family == "qwen_image" else tiny_z_image
    small = dict(base_model=str(model), train_data_dir=str(demo_images), output_dir=str(tmp_path / "out"),
                 resolution=64, lora_rank=4, learning_rate=1e-2, max_train_steps=3, save_steps=0, seed=1,
                 batch_size=min(preset.values.get("batch_size", 1), 2), max_sequence_length=32)
    job = run_job(TrainConfig().replace(**preset.values).replace(**small).validate())
    assert job.status == "finished", job.error
    log = job.snapshot().log
    assert any(f"weights bfloat16, base {preset.values['base_quantization']}" in line for line in log), log
    assert any("Export check passed" in line for line in log), log
    assert not any("instead" in line for line in log), log  # no 8-bit or 4-bit fallback under the CPU check
