"""init_lora: reading kohya, diffusers and PEFT LoRA files and loading them into a run's PEFT adapters."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file

from lora_studio.errors import ModelLoadError
from lora_studio.export.diffusers_format import save_diffusers_lora
from lora_studio.export.kohya import peft_to_kohya, save_kohya_lora
from lora_studio.export.lora_state import apply_init_lora, load_lora_file
from lora_studio.export.verify import render

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
PROMPT, SEED = "a green circle", 2


def pipe_with_adapters(folder, family, *, rank=4, alpha=2.0, te=True, targets=UNET_TARGETS, randomize=False,
                       seed=0):
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    names = (["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]) if te else []
    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets))
    for name in names:
        getattr(pipe, name).add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                                   target_modules=TE_TARGETS))
    if randomize:
        for model in [pipe.unet] + [getattr(pipe, n) for n in names]:
            for pname, param in model.named_parameters():
                if "lora_B" in pname:
                    param.data.normal_(0, 0.2)
    return pipe, names


def states(pipe, names):
    return get_peft_model_state_dict(pipe.unet), {n: get_peft_model_state_dict(getattr(pipe, n)) for n in names}


def text_encoders(pipe, family):
    return {n: getattr(pipe, n) for n in (["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"])}


@pytest.fixture(scope="module")
def trained(tiny_sd15, tmp_path_factory):
    """A 'trained' SD1.5 LoRA (rank 4, alpha 2) written as kohya (fp32) and diffusers files."""
    out = tmp_path_factory.mktemp("init_lora")
    pipe, names = pipe_with_adapters(tiny_sd15, "sd15", randomize=True)
    unet_sd, te_sds = states(pipe, names)
    kohya = save_kohya_lora(out / "style.safetensors",
                            peft_to_kohya(unet_sd, te_sds, "sd15", 2.0, dtype=torch.float32), {"ss_network_dim": "4"})
    diffusers = save_diffusers_lora(out / "diffusers", type(pipe), unet_sd, te_sds, rank=4, alpha=2.0, family="sd15")
    return {"kohya": kohya, "diffusers": diffusers / "pytorch_lora_weights.safetensors", "unet": unet_sd,
            "te": te_sds, "image": render(pipe, PROMPT, SEED), "dir": out}


def test_detects_formats(trained, tmp_path):
    assert load_lora_file(trained["kohya"])[0] == "kohya"
    fmt, state, meta = load_lora_file(trained["diffusers"].parent)  # the folder works too
    assert fmt == "diffusers" and "lora_adapter_metadata" in meta
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in trained["unet"].items()},
              str(peft_dir / "adapter_model.safetensors"))
    (peft_dir / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 2.0, "peft_type": "LORA"}))
    assert load_lora_file(peft_dir)[0] == "peft"
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="not a LoRA file"):
        load_lora_file(tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match="not found"):
        load_lora_file(tmp_path / "missing.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("source", ["kohya", "diffusers"])
def test_round_trip_into_a_fresh_run(source, trained, tiny_sd15):
    pipe, names = pipe_with_adapters(tiny_sd15, "sd15", seed=7)
    loaded = apply_init_lora(pipe.unet, text_encoders(pipe, "sd15"), trained[source], "sd15")
    assert loaded == {"unet": len(trained["unet"]) // 2, "text_encoder": len(trained["te"]["text_encoder"]) // 2}
    unet_sd, te_sds = states(pipe, names)
    assert all(torch.equal(unet_sd[k], trained["unet"][k]) for k in trained["unet"])
    assert all(torch.equal(te_sds["text_encoder"][k], v) for k, v in trained["te"]["text_encoder"].items())
    assert np.array_equal(render(pipe, PROMPT, SEED), trained["image"])


@pytest.mark.slow
def test_peft_folder_and_other_alpha_keep_the_effect(trained, tiny_sd15, tmp_path):
    """A run with alpha 8 continuing a LoRA trained with alpha 2: lora_up is rescaled, the output is unchanged."""
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in trained["unet"].items()},
              str(peft_dir / "adapter_model.safetensors"))
    (peft_dir / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 2.0, "peft_type": "LORA"}))
    pipe, names = pipe_with_adapters(tiny_sd15, "sd15", alpha=8.0, te=False)
    apply_init_lora(pipe.unet, text_encoders(pipe, "sd15"), peft_dir, "sd15")
    unet_sd, _ = states(pipe, names)
    key = next(k for k in unet_sd if k.endswith("lora_B.weight"))
    assert torch.allclose(unet_sd[key], trained["unet"][key] * 0.25)
    reference, _ = pipe_with_adapters(tiny_sd15, "sd15", te=False)  # alpha 2, the file's own weights
    set_peft_model_state_dict(reference.unet, trained["unet"])
    assert np.abs(render(pipe, PROMPT, SEED) - render(reference, PROMPT, SEED)).max() < 1e-5


def test_wrong_rank_names_what_the_file_has(trained, tiny_sd15):
    pipe, _ = pipe_with_adapters(tiny_sd15, "sd15", rank=8)
    with pytest.raises(ModelLoadError) as err:
        apply_init_lora(pipe.unet, text_encoders(pipe, "sd15"), trained["kohya"], "sd15")
    message = str(err.value)
    assert "'style.safetensors' has rank 4 on to_q,to_k,to_v,to_out.0 (UNet" in message
    assert "this run has rank 8" in message and "Set lora_rank: 4 to continue" in message


def test_wrong_targets_and_text_encoder(trained, tiny_sd15):
    pipe, _ = pipe_with_adapters(tiny_sd15, "sd15", targets=["to_q", "to_v"])
    with pytest.raises(ModelLoadError, match=r"target_modules: \[to_q, to_k, to_v, to_out.0\]"):
        apply_init_lora(pipe.unet, text_encoders(pipe, "sd15"), trained["diffusers"], "sd15")
    pipe, _ = pipe_with_adapters(tiny_sd15, "sd15", te=False)
    with pytest.raises(ModelLoadError, match="train_text_encoder: true"):
        apply_init_lora(pipe.unet, text_encoders(pipe, "sd15"), trained["kohya"], "sd15")


def test_sdxl_kohya_init(tiny_sdxl, tmp_path):
    source, names = pipe_with_adapters(tiny_sdxl, "sdxl", randomize=True)
    unet_sd, te_sds = states(source, names)
    path = save_kohya_lora(tmp_path / "xl.safetensors",
                           peft_to_kohya(unet_sd, te_sds, "sdxl", 2.0, unet_config=source.unet.config), {})
    pipe, _ = pipe_with_adapters(tiny_sdxl, "sdxl", seed=3)
    loaded = apply_init_lora(pipe.unet, text_encoders(pipe, "sdxl"), path, "sdxl")
    assert set(loaded) == {"unet", "text_encoder", "text_encoder_2"}
    got_unet, got_te = states(pipe, names)
    assert all(torch.equal(got_unet[k], unet_sd[k].half().float()) for k in unet_sd)  # fp16 file
    assert all(torch.equal(got_te["text_encoder_2"][k], v.half().float()) for k, v in te_sds["text_encoder_2"].items())
    with pytest.raises(ModelLoadError, match="does not fit this sd15 model.*looks like an SDXL LoRA"):
        apply_init_lora(pipe.unet, {}, path, "sd15")  # an SDXL file read as SD1.5


def test_rank_only_mismatch_does_not_mention_targets(trained, tiny_sd15):
    pipe, _ = pipe_with_adapters(tiny_sd15, "sd15", rank=2)
    with pytest.raises(ModelLoadError) as err:
        apply_init_lora(pipe.unet, text_encoders(pipe, "sd15"), trained["diffusers"], "sd15")
    assert str(err.value).endswith("Set lora_rank: 4 to continue from it.")
