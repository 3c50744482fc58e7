"""The parts of the FLUX trainer on their own: noise-level samplers, quantized bases, LoRA layer choice,
single-file checkpoints in the original BFL layout."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

from lora_studio.config import TrainConfig
from lora_studio.errors import ConfigError, TrainingError
from lora_studio.training.flow_matching import loss_weights, sample_sigmas, shift_mu
from test_flux import flux_config, tiny_chroma, tiny_flux  # noqa: F401  (fixtures)

N = 6000


def _draw(method: str, **kwargs) -> np.ndarray:
    gens = [torch.Generator().manual_seed(i) for i in range(N)]
    return sample_sigmas(method, gens, **kwargs).numpy().astype(np.float64)


def _expected(transform) -> float:
    """E[transform(sigmoid(z))] for z ~ N(0, 1), by quadrature."""
    z = np.linspace(-8, 8, 20001)
    t = 1 / (1 + np.exp(-z))
    density = np.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    return float(np.trapezoid(transform(t) * density, z))


def test_timestep_samplers_have_the_distributions_they_claim():
    uniform = _draw("uniform")
    assert abs(uniform.mean() - 0.5) < 0.015 and abs(uniform.var() - 1 / 12) < 0.005
    sigmoid = _draw("sigmoid")
    assert abs(sigmoid.mean() - 0.5) < 0.01 and abs(np.median(sigmoid) - 0.5) < 0.015
    assert sigmoid.var() < uniform.var()  # concentrated around the middle
    logit = _draw("logit_normal", logit_mean=1.0, logit_std=0.5)
    assert abs(np.median(logit) - 1 / (1 + math.exp(-1.0))) < 0.01  # the median is sigmoid(mean)
    assert abs(np.log(logit / (1 - logit)).std() - 0.5) < 0.02

    shifted = _draw("shift", shift=3.0)
    expected = _expected(lambda t: 3 * t / (1 + 2 * t))
    assert abs(shifted.mean() - expected) < 0.01 and shifted.mean() > sigmoid.mean() + 0.1
    assert np.allclose(_draw("shift", shift=1.0), sigmoid)  # shift 1 changes nothing

    config = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}
    assert shift_mu(256, config) == pytest.approx(0.5) and shift_mu(4096, config) == pytest.approx(1.15)
    small, large = (_draw("flux_shift", mu=shift_mu(n, config)) for n in (256, 4096))
    for mu, draws in ((0.5, small), (1.15, large)):
        assert abs(draws.mean() - _expected(lambda t, mu=mu: math.exp(mu) / (math.exp(mu) + 1 / t - 1))) < 0.01
    assert large.mean() > small.mean() > sigmoid.mean()  # bigger images train at more noise, as FLUX samples
    assert all(d.min() >= 1e-3 and d.max() <= 1.0 for d in (uniform, sigmoid, logit, shifted, small, large))


def test_loss_weightings_come_from_diffusers():
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    assert torch.equal(loss_weights("none", sigmas), torch.ones(3))
    assert torch.allclose(loss_weights("sigma_sqrt", sigmas), sigmas ** -2)
    assert torch.allclose(loss_weights("cosmap", sigmas), 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2)))


def _prepared_trainer(model, data, out, **changes):
    from lora_studio.training.events import EventBus
    from lora_studio.training.job import make_trainer
    from lora_studio.training.run_folder import RunFolder

    cfg = flux_config(model, data, out, **changes)
    trainer = make_trainer(cfg, RunFolder.create(cfg), EventBus())
    trainer.prepare()
    return trainer


@pytest.mark.parametrize("mode", ["nf4", "int8", "fp8"])
@pytest.mark.slow
def test_quantized_bases_train_with_lora_gradients(mode, tiny_flux, demo_images, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("LORA_STUDIO_CPU_CHECK", "1")  # nf4: bitsandbytes' CPU kernels
    trainer = _prepared_trainer(tiny_flux, demo_images, tmp_path / "out", base_quantization=mode)
    assert trainer.quantization == mode
    q = trainer.denoiser.transformer_blocks[0].attn.to_q.base_layer
    stored = {"nf4": "Params4bit", "int8": "Int8Tensor", "fp8": "Parameter"}[mode]
    assert type(q.weight).__name__ == stored
    if mode == "fp8":
        assert q.weight.dtype == torch.float8_e4m3fn
    params = [p for p in trainer.denoiser.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for step in range(2):  # lora_B starts at zero: its gradient first, then lora_A's after one update
        loss = trainer.compute_loss(trainer.batches(0)[0])
        assert torch.isfinite(loss)
        loss.backward()
        if step == 0:
            grads = {n: p.grad for n, p in trainer.denoiser.named_parameters() if p.requires_grad}
            assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.grad is None for p in trainer.denoiser.parameters() if not p.requires_grad)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["nf4", "int8", "fp8"])
def test_quantized_bf16_runs_pass_the_export_check(mode, tiny_flux, demo_images, tmp_path, monkeypatch):  # noqa: F811
    """bf16 over a quantized base, as on a GPU: the fresh pipeline is quantized the same way and renders in bf16;
    the trained LoRA is compared as the file stores it and diffusers loads it (rounding alone moves a bf16
    render by more than the tolerance)."""
    from helpers import run_job

    monkeypatch.setenv("LORA_STUDIO_CPU_CHECK", "1")
    job = run_job(flux_config(tiny_flux, demo_images, tmp_path / "out", base_quantization=mode, max_train_steps=2,
                              mixed_precision="bf16"))
    assert job.status == "finished", job.error
    log = job.snapshot().log
    assert any(f"weights bfloat16, base {mode}" in line for line in log), log
    passed = [line for line in log if "Export check passed" in line]
    assert passed and "strength 0 vs base 0" in passed[0]
    assert float(passed[0].split("within ")[1].split(" ")[0]) < 1e-3


def test_nf4_without_cuda_says_so_and_trains_unquantized(monkeypatch):
    from lora_studio.training.quantize import usable_quantization

    monkeypatch.delenv("LORA_STUDIO_CPU_CHECK", raising=False)
    said = []
    assert usable_quantization("nf4", torch.device("cpu"), lambda m, level="info": said.append(m)) == "none"
    assert said == ["base_quantization nf4 needs a CUDA GPU (bitsandbytes); training on an unquantized base instead "
                    "(about twice the memory for its weights)."]
    assert usable_quantization("fp8", torch.device("cpu")) == "fp8"


def test_lora_layers_follow_the_preset_and_block_filters(tiny_flux):  # noqa: F811
    from diffusers import FluxTransformer2DModel

    from lora_studio.training.flux import target_modules

    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux / "transformer")
    attention = target_modules(transformer, TrainConfig())
    assert len(attention) == 2 * 8 + 2 * 3 and "single_transformer_blocks.1.attn.to_v" in attention
    every = target_modules(transformer, TrainConfig(lora_targets="all_linear"))
    assert set(attention) < set(every) and "transformer_blocks.0.ff.net.2" in every
    assert "single_transformer_blocks.0.proj_mlp" in every and "proj_out" not in every  # not the output layer
    filtered = target_modules(transformer, TrainConfig(train_double_block_indices="1", train_single_block_indices="none"))
    assert filtered == [n for n in attention if n.startswith("transformer_blocks.1.")]
    assert target_modules(transformer, TrainConfig(target_modules=["to_q"])) == [
        "transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_q", "single_transformer_blocks.0.attn.to_q",
        "single_transformer_blocks.1.attn.to_q"]
    with pytest.raises(ConfigError, match="block 5 does not exist: this model has blocks 0 to 1"):
        target_modules(transformer, TrainConfig(train_double_block_indices="0-5"))
    with pytest.raises(ConfigError, match="'to_qq' matches no layer"):
        target_modules(transformer, TrainConfig(target_modules=["to_qq"]))
    with pytest.raises(ConfigError, match="no layer gets a LoRA"):
        target_modules(transformer, TrainConfig(train_double_block_indices="none", train_single_block_indices="none"))


def test_a_layer_outside_comfyuis_map_is_refused_before_writing(tiny_flux):  # noqa: F811
    from diffusers import FluxTransformer2DModel

    from lora_studio.export.flux_lora import check_placement

    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux / "transformer")
    lora = {"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
            "transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4)}
    assert check_placement(lora, transformer) == 1
    unmapped = {k.replace("to_q", "norm_q"): v for k, v in lora.items()}
    with pytest.raises(TrainingError, match="'transformer_blocks.0.attn.norm_q' has no place in ComfyUI's FLUX key map"):
        check_placement(unmapped, transformer)
    missing = {k.replace("to_q", "to_qq"): v for k, v in lora.items()}
    with pytest.raises(TrainingError, match="'transformer_blocks.0.attn.to_qq' is not a layer of this model"):
        check_placement(missing, transformer)


def test_bfl_single_file_is_detected_and_loads_to_the_same_weights(tiny_flux, tmp_path):  # noqa: F811
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders import single_file_utils
    from safetensors.torch import load_file

    from lora_studio.models.flux_loading import load_flux_pipeline
    from lora_studio.models.flux_single_file import bfl_to_diffusers
    from lora_studio.models.detect import detect_family
    from lora_studio.models.tiny_flux import save_flux_single_file

    path = save_flux_single_file(tiny_flux, tmp_path / "flux1-tiny.safetensors")
    bfl = load_file(str(path))
    assert "double_blocks.0.img_attn.qkv.weight" in bfl and "single_blocks.1.linear1.weight" in bfl
    assert detect_family(str(path)) == "flux"
    pipe = load_flux_pipeline(str(path), "flux", single_file_config=str(tiny_flux))
    original = FluxTransformer2DModel.from_pretrained(tiny_flux / "transformer").state_dict()
    loaded = pipe.transformer.state_dict()
    assert set(loaded) == set(original) and all(torch.equal(loaded[k], original[k]) for k in original)
    # the same conversion as diffusers' own BFL converter (whose width is fixed at the released 3072)
    source = inspect.getsource(single_file_utils.convert_flux_transformer_checkpoint_to_diffusers)
    namespace = dict(vars(single_file_utils))
    exec(source.replace("inner_dim = 3072", "inner_dim = 32"), namespace)
    reference = namespace["convert_flux_transformer_checkpoint_to_diffusers"](dict(bfl))
    ours = bfl_to_diffusers({"model.diffusion_model." + k: v for k, v in bfl.items()})
    assert set(reference) == set(ours) and all(torch.equal(reference[k], ours[k]) for k in ours)


def test_chroma_and_lora_files_are_told_apart_from_flux_checkpoints(tmp_path):
    from safetensors.torch import save_file

    from lora_studio.errors import ModelLoadError
    from lora_studio.models.detect import detect_family

    tensor = torch.zeros(1)
    save_file({"distilled_guidance_layer.in_proj.bias": tensor, "double_blocks.0.img_attn.qkv.weight": torch.zeros(1)},
              str(tmp_path / "chroma.safetensors"))
    assert detect_family(str(tmp_path / "chroma.safetensors")) == "chroma"
    save_file({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": tensor}, str(tmp_path / "comfy.safetensors"))
    assert detect_family(str(tmp_path / "comfy.safetensors")) == "flux"
    save_file({"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": tensor}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ModelLoadError, match="is a LoRA file, not a base model"):
        detect_family(str(tmp_path / "lora.safetensors"))


def test_folders_are_detected(tiny_flux, tiny_chroma):  # noqa: F811
    from lora_studio.models.detect import family_info

    flux, chroma = family_info(str(tiny_flux)), family_info(str(tiny_chroma))
    assert (flux.family, flux.name, flux.default_resolution) == ("flux", "FLUX.1", 1024)
    assert flux.prediction_type == chroma.prediction_type == "flow_matching"
    assert chroma.family == "chroma" and flux.presets == ["flux_12gb", "flux_16gb", "flux_24gb"]


def _random_lora_file(model_dir, path):
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from lora_studio.export.flux_lora import save_flux_lora

    transformer = FluxTransformer2DModel.from_pretrained(model_dir / "transformer")
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(0)
    for name, p in transformer.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return save_flux_lora(path, get_peft_model_state_dict(transformer), rank=4, alpha=4.0, metadata={})


@pytest.mark.slow
def test_grid_and_generate_render_flux_with_its_own_steps_and_guidance(tiny_flux, tmp_path, monkeypatch):  # noqa: F811
    from lora_studio.__main__ import main
    from lora_studio.inference import grid
    from lora_studio.inference.grid import PipelineCache, RenderSettings, model_render_defaults, render_grid
    from lora_studio.models.tiny_flux import build_tiny_flux

    assert model_render_defaults(str(tiny_flux)) == {"steps": 28, "cfg": 3.5}
    schnell = build_tiny_flux(tmp_path / "schnell", guidance=False)
    assert model_render_defaults(str(schnell)) == {"steps": 4, "cfg": 0.0}
    lora = _random_lora_file(tiny_flux, tmp_path / "style.safetensors")
    settings = RenderSettings("a red circle", steps=2, cfg=3.5, width=64, height=64)
    result = render_grid(str(tiny_flux), [("style", lora)], settings, [0.0, 1.0], cache=PipelineCache())
    base, styled = (np.asarray(im, dtype=np.int16) for im in result.cells[0])
    assert np.abs(styled - base).max() > 0 and result.tags == ["<lora:style:1>"]

    used = []
    monkeypatch.setattr(grid, "render_grid", lambda *a, **k: used.append(a[2]) or render_grid(*a, **k))
    out = tmp_path / "grid.png"
    assert main(["generate", "--base", str(schnell), "--lora", str(lora), "--prompt", "a red circle",
                 "--size", "64", "--strengths", "0,1", "--out", str(out)]) == 0
    assert out.is_file() and (used[0].steps, used[0].cfg) == (4, 0.0)


def test_training_tab_offers_flux_presets_layers_and_unfolds_its_settings(tiny_flux):  # noqa: F811
    from lora_studio.ui.train_family import family_choices

    choices = family_choices(str(tiny_flux), "auto", 16.0)
    assert choices.family == "flux" and choices.group == "flow" and not choices.llm
    assert choices.preset == "flux_16gb" and [v for _, v in choices.presets] == ["", "flux_12gb", "flux_16gb",
                                                                                   "flux_24gb"]
    assert "attn.add_q_proj" in choices.targets and "proj_mlp" in choices.targets and choices.target_value == []
    assert "FLUX.1" in choices.text


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flux_12gb", "flux_16gb", "flux_24gb"])
def test_every_flux_preset_runs_as_set(name, tiny_flux, demo_images, tmp_path, monkeypatch):  # noqa: F811
    """The preset's own settings (nf4 / fp8 base, 8-bit AdamW, checkpointing, bf16) on the tiny FLUX model."""
    from helpers import run_preset_as_set

    monkeypatch.setenv("LORA_STUDIO_CPU_CHECK", "1")
    job = run_preset_as_set(name, tiny_flux, demo_images, tmp_path / "out")
    losses = [loss for _, loss in job.snapshot().losses]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)


def test_each_registry_rule_says_yes_for_its_own_family_only(tiny_flux, tiny_chroma, tiny_sd15, tiny_sdxl):  # noqa: F811
    import json

    from lora_studio.families import FAMILIES

    def by_index(folder) -> list[str]:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        return [f.id for f in FAMILIES.values() if f.matches_index and f.matches_index(index, folder)]

    def by_keys(keys) -> list[str]:
        return [f.id for f in FAMILIES.values() if f.matches_keys and f.matches_keys(set(keys))]

    assert [by_index(m) for m in (tiny_flux, tiny_chroma, tiny_sd15, tiny_sdxl)] == [["flux"], ["chroma"], ["sd15"],
                                                                                   ["sdxl"]]
    unet = "model.diffusion_model.input_blocks.0.0.weight"
    assert by_keys(["double_blocks.0.img_attn.qkv.weight", "time_in.in_layer.weight"]) == ["flux"]
    assert by_keys(["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"]) == ["flux"]
    assert by_keys(["double_blocks.0.img_attn.qkv.weight", "distilled_guidance_layer.in_proj.weight"]) == ["chroma"]
    assert by_keys([unet]) == ["sd15"] and by_keys([unet, "conditioner.embedders.1.model.ln_final.weight"]) == ["sdxl"]
    assert by_keys(["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"]) == []  # a LoRA file
    assert by_keys(["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]) == []


def test_testing_tab_fills_in_flux_steps_and_guidance_only_where_the_app_may_read(tiny_flux, tiny_sd15, tmp_path):  # noqa: F811
    from lora_studio.ui.context import StudioContext
    from lora_studio.ui.test_tab import _steps_and_cfg_for

    local = StudioContext(outputs=tmp_path / "out", models_dir=tmp_path / "models")
    assert _steps_and_cfg_for(local, str(tiny_flux)) == (28, 3.5)
    unchanged = ({"__type__": "update"},) * 2  # gr.skip(): the fields keep what they hold
    assert _steps_and_cfg_for(local, str(tiny_sd15)) == unchanged  # SD models keep the tab's own settings
    shared = StudioContext(outputs=tmp_path / "out", models_dir=tmp_path / "models", shared=True)
    assert _steps_and_cfg_for(shared, str(tiny_flux)) == unchanged  # a folder the shared app may not read


def test_prompt_length_is_at_most_what_the_t5_tokenizer_allows():
    """max_sequence_length, capped by the T5 tokenizer's model_max_length: the released models' 512 changes nothing,
    the FLUX miniature (trained at 32) is trained and rendered at 32."""
    from types import SimpleNamespace

    from lora_studio.inference.grid import _prompt_length
    from lora_studio.models.flux_loading import prompt_length

    flux = SimpleNamespace(tokenizer=SimpleNamespace(model_max_length=77),
                           tokenizer_2=SimpleNamespace(model_max_length=512))
    miniature = SimpleNamespace(tokenizer=flux.tokenizer, tokenizer_2=SimpleNamespace(model_max_length=32))
    chroma = SimpleNamespace(tokenizer=SimpleNamespace(model_max_length=512))
    assert prompt_length(flux, 512) == 512 and prompt_length(flux, 256) == 256
    assert prompt_length(miniature, 512) == 32 and prompt_length(chroma) == 512
    FluxPipeline = type("FluxPipeline", (), {})
    pipe = FluxPipeline()
    pipe.tokenizer, pipe.tokenizer_2 = miniature.tokenizer, miniature.tokenizer_2
    assert _prompt_length(pipe) == {"max_sequence_length": 32}
    assert _prompt_length(SimpleNamespace()) == {}  # Stable Diffusion: no such argument
