"""The reload-and-compare export check, and the diffusers-format file (alpha kept through its metadata)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from lora_studio.errors import TrainingError
from lora_studio.export.diffusers_format import save_diffusers_lora
from lora_studio.export.kohya import peft_to_kohya, save_kohya_lora
from lora_studio.export.verify import check_export, load_fresh_pipeline, render

PROMPT, SEED, RANK, ALPHA = "a blue square", 5, 4, 8.0


def lora_pipe(folder, family):
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    base = render(pipe, PROMPT, SEED)
    tes = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
    torch.manual_seed(1)
    pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for name in tes:
        getattr(pipe, name).add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian",
                                                   target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    for model in [pipe.unet] + [getattr(pipe, n) for n in tes]:
        for pname, param in model.named_parameters():
            if "lora_B" in pname:
                param.data.normal_(0, 0.15)
    states = {n: get_peft_model_state_dict(getattr(pipe, n)) for n in tes}
    return pipe, base, render(pipe, PROMPT, SEED), get_peft_model_state_dict(pipe.unet), states


@pytest.fixture(scope="module")
def sd15(tiny_sd15):
    return (tiny_sd15,) + lora_pipe(tiny_sd15, "sd15")


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl):
    return (tiny_sdxl,) + lora_pipe(tiny_sdxl, "sdxl")


@pytest.mark.slow
def test_render_is_deterministic(sd15):
    folder, pipe, base, expected, *_ = sd15
    again = render(pipe, PROMPT, SEED)
    assert again.shape == (1, 64, 64, 3) and again.dtype == np.float32
    assert np.array_equal(again, expected)
    assert not np.array_equal(render(pipe, PROMPT, SEED + 1), expected)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.slow
def test_diffusers_file_reloads_with_its_alpha(family, sd15, sdxl, tmp_path):
    folder, pipe, base, expected, unet_sd, te_sds = sd15 if family == "sd15" else sdxl
    out = save_diffusers_lora(tmp_path / "diffusers", type(pipe), unet_sd, te_sds, rank=RANK, alpha=ALPHA,
                              family=family)
    weights = out / "pytorch_lora_weights.safetensors"
    with safe_open(str(weights), framework="pt") as fh:
        meta = json.loads(fh.metadata()["lora_adapter_metadata"])
    assert meta["unet.lora_alpha"] == ALPHA and meta["unet.r"] == RANK
    assert meta["text_encoder.lora_alpha"] == ALPHA
    assert ("text_encoder_2.lora_alpha" in meta) == (family == "sdxl")
    fresh = load_fresh_pipeline(folder, family)
    fresh.load_lora_weights(str(out), weight_name=weights.name, adapter_name="x")
    assert np.abs(render(fresh, PROMPT, SEED) - expected).max() < 1e-5
    fresh.set_adapters(["x"], adapter_weights=[0.0])
    assert np.array_equal(render(fresh, PROMPT, SEED), base)
    # written again over itself: the swap leaves one complete folder and no temporaries
    save_diffusers_lora(out, type(pipe), unet_sd, te_sds, rank=RANK, alpha=ALPHA, family=family)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diffusers"]


@pytest.mark.slow
def test_check_catches_a_wrong_alpha(sd15, tmp_path):
    folder, pipe, base, expected, unet_sd, te_sds = sd15
    wrong = save_kohya_lora(tmp_path / "wrong.safetensors", peft_to_kohya(unet_sd, te_sds, "sd15", RANK), {})
    with pytest.raises(TrainingError, match="Export check failed.*differ from the trained model"):
        check_export(folder, "sd15", wrong, expected_images=expected, base_images=base, prompt=PROMPT, seed=SEED)


@pytest.mark.slow
def test_check_catches_a_missing_module(sd15, tmp_path):
    folder, pipe, base, expected, unet_sd, te_sds = sd15
    state = peft_to_kohya(unet_sd, te_sds, "sd15", ALPHA)
    state = {k: v for k, v in state.items() if "up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v" not in k}
    path = save_kohya_lora(tmp_path / "partial.safetensors", state, {})
    with pytest.raises(TrainingError, match="Export check failed"):
        check_export(folder, "sd15", path, expected_images=expected, base_images=base, prompt=PROMPT, seed=SEED)


@pytest.mark.slow
def test_check_passes_and_reports(sd15, tmp_path):
    folder, pipe, base, expected, unet_sd, te_sds = sd15
    path = save_kohya_lora(tmp_path / "ok.safetensors", peft_to_kohya(unet_sd, te_sds, "sd15", ALPHA), {})
    report = check_export(folder, "sd15", path, expected_images=expected, base_images=None, prompt=PROMPT, seed=SEED)
    assert report.passed and report.base_diff is None and report.self_base_diff == 0.0
    assert report.effect > 10 * report.atol  # the check can tell this LoRA from the base
    assert "ok.safetensors reloads to the trained output" in str(report)


@pytest.mark.slow
def test_check_catches_a_base_mismatch(sd15, tmp_path):
    folder, pipe, base, expected, unet_sd, te_sds = sd15
    path = save_kohya_lora(tmp_path / "ok.safetensors", peft_to_kohya(unet_sd, te_sds, "sd15", ALPHA), {})
    with pytest.raises(TrainingError, match="strength 0 does not give the base"):
        check_export(folder, "sd15", path, expected_images=expected, base_images=np.clip(base + 0.05, 0, 1),
                     prompt=PROMPT, seed=SEED)


@pytest.mark.slow
def test_half_precision_base_needs_held_dtypes(tiny_sd15, tmp_path):
    """A trainer that held the frozen weights in fp16 (the VAE in fp32) renders with those roundings:
    held_dtypes mirrors them in the fresh pipeline."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15, safety_checker=None)
    pipe.unet.to(torch.float16).to(torch.float32)
    pipe.text_encoder.to(torch.float16).to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    base = render(pipe, PROMPT, SEED)
    pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=["to_q"]))
    for pname, param in pipe.unet.named_parameters():
        if "lora_B" in pname:
            param.data.normal_(0, 0.3)
    expected = render(pipe, PROMPT, SEED)
    path = save_kohya_lora(tmp_path / "half.safetensors",
                           peft_to_kohya(get_peft_model_state_dict(pipe.unet), {}, "sd15", ALPHA), {})
    held = {"unet": torch.float16, "text_encoder": torch.float16, "vae": torch.float32}
    report = check_export(tiny_sd15, "sd15", path, expected_images=expected, base_images=base, prompt=PROMPT,
                          seed=SEED, held_dtypes=held)
    assert report.base_diff == 0.0
    with pytest.raises(TrainingError, match="strength 0"):  # a float32 reload has other frozen weights
        check_export(tiny_sd15, "sd15", path, expected_images=expected, base_images=base, prompt=PROMPT, seed=SEED)
    with pytest.raises(TrainingError, match="strength 0"):  # so has one whose VAE is rounded too
        check_export(tiny_sd15, "sd15", path, expected_images=expected, base_images=base, prompt=PROMPT, seed=SEED,
                     held_dtypes={**held, "vae": torch.float16})
