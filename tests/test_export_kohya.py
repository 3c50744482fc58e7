"""Kohya/A1111 export: key names (SD1.5 diffusers names, SDXL SAI names, lora_te/te1/te2), one alpha per
module, the inverse conversion, metadata and hash, and reload into a fresh pipeline with diffusers."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from lora_studio.export.kohya import kohya_to_peft, peft_to_kohya, sai_block_map, save_kohya_lora, unet_module_names
from lora_studio.export.metadata import build_kohya_metadata, model_hash, read_metadata
from lora_studio.export.verify import check_export, render

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
PROMPT, SEED = "a red circle on a light background", 3
RANK, ALPHA = 4, 2.0  # alpha != rank: a lost alpha shows as a wrong strength


def lora_pipe(folder, family, *, seed=0, rank=RANK, alpha=ALPHA):
    """A tiny pipeline with LoRA on the UNet and every text encoder, lora_B random so the LoRA matters."""
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    base = render(pipe, PROMPT, SEED)
    tes = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                     target_modules=UNET_TARGETS))
    for name in tes:
        getattr(pipe, name).add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                                   target_modules=TE_TARGETS))
    for model in [pipe.unet] + [getattr(pipe, n) for n in tes]:
        for pname, param in model.named_parameters():
            if "lora_B" in pname:
                param.data.normal_(0, 0.3)
    states = {n: get_peft_model_state_dict(getattr(pipe, n)) for n in tes}
    return pipe, base, render(pipe, PROMPT, SEED), get_peft_model_state_dict(pipe.unet), states


@pytest.fixture(scope="module")
def sd15(tiny_sd15):
    return lora_pipe(tiny_sd15, "sd15")


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl):
    return lora_pipe(tiny_sdxl, "sdxl")


def _modules(state):
    return {k.split(".", 1)[0] for k in state}


def test_sd15_keys(sd15):
    pipe, _, _, unet_sd, te_sds = sd15
    state = peft_to_kohya(unet_sd, te_sds, "sd15", ALPHA)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight" in state
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight" in state
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in state
    assert all(k.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_",
                             "lora_te_text_model_encoder_layers_")) for k in state)
    modules = _modules(state)
    assert len(modules) == (len(unet_sd) + len(te_sds["text_encoder"])) // 2
    for m in modules:  # down, up and one float alpha per module
        assert {f"{m}.lora_down.weight", f"{m}.lora_up.weight", f"{m}.alpha"} <= set(state)
        assert state[f"{m}.alpha"].ndim == 0 and state[f"{m}.alpha"].item() == ALPHA
        assert state[f"{m}.lora_down.weight"].dtype == torch.float16


@pytest.mark.slow
def test_sdxl_keys_use_sai_names(sdxl):
    pipe, _, _, unet_sd, te_sds = sdxl
    state = peft_to_kohya(unet_sd, te_sds, "sdxl", ALPHA, unet_config=pipe.unet.config)
    names = _modules(state)
    # tiny SDXL: down block 1 (the attention one) follows resnet 1 and the downsampler 2
    assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_out_0" in names
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_v" in names
    assert "lora_unet_output_blocks_1_1_transformer_blocks_1_attn2_to_k" in names
    assert not any(b in n for n in names for b in ("down_blocks", "mid_block", "up_blocks"))
    assert "lora_te1_text_model_encoder_layers_1_self_attn_out_proj" in names
    assert "lora_te2_text_model_encoder_layers_0_self_attn_k_proj" in names  # te2 keys already had text_model.
    assert not any(n.startswith("lora_te_") for n in names)
    assert sum(k.endswith(".alpha") for k in state) == len(names)
    with pytest.raises(ValueError, match="unet_config"):
        peft_to_kohya(unet_sd, te_sds, "sdxl", ALPHA)


def test_sai_map_real_layouts_agree_with_diffusers_loader():
    """Real SDXL layout: known names, and diffusers' own SGM reader maps every attention module back."""
    from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key, _maybe_map_sgm_blocks_to_diffusers

    config = dict(sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                  use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816)
    m = sai_block_map(config)
    assert m["down_blocks.1.attentions.0"] == "input_blocks.4.1"
    assert m["down_blocks.2.attentions.1"] == "input_blocks.8.1"
    assert m["down_blocks.0.downsamplers.0.conv"] == "input_blocks.3.0.op"
    assert m["mid_block.attentions.0"] == "middle_block.1"
    assert m["up_blocks.0.attentions.0"] == "output_blocks.0.1"
    assert m["up_blocks.1.attentions.2"] == "output_blocks.5.1"
    assert m["up_blocks.1.upsamplers.0.conv"] == "output_blocks.5.2.conv"
    modules = [n for n in unet_module_names(config) if ".attn" in n and n.endswith(("to_q", "to_out.0"))]
    assert len(modules) == 2 * 2 * 70
    ours = peft_to_kohya({f"{n}.lora_A.weight": torch.zeros(1, 1) for n in modules}, {}, "sdxl", 1.0,
                         unet_config=config)
    assert all("input_blocks" in k or "middle_block" in k or "output_blocks" in k for k in ours)
    fake = {k: v for k, v in ours.items() if k.endswith("lora_down.weight")}
    mapped = _maybe_map_sgm_blocks_to_diffusers(fake, type("C", (), {"layers_per_block": 2})())
    back = sorted(_convert_unet_lora_key(k).replace(".processor", "").replace("_lora.down.weight", "")
                  .replace("to_out", "to_out.0") for k in mapped)
    assert back == sorted(modules)
    sd15 = sai_block_map({"layers_per_block": 2, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                          "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3})
    assert sd15["down_blocks.0.attentions.0"] == "input_blocks.1.1"
    assert sd15["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.1.conv"
    assert sd15["up_blocks.3.attentions.2"] == "output_blocks.11.1"


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_round_trip(family, sd15, sdxl):
    pipe, _, _, unet_sd, te_sds = sd15 if family == "sd15" else sdxl
    state = peft_to_kohya(unet_sd, te_sds, family, ALPHA, unet_config=pipe.unet.config, dtype=torch.float32)
    unet_back, te_back, alphas = kohya_to_peft(state, family, pipe.unet.config)
    assert unet_back.keys() == unet_sd.keys()
    assert all(torch.equal(unet_back[k], unet_sd[k]) for k in unet_sd)
    for name, sd in te_sds.items():
        assert te_back[name].keys() == sd.keys()
        assert all(torch.equal(te_back[name][k], sd[k]) for k in sd)
    assert len(alphas) == len(unet_sd) // 2 + sum(len(sd) for sd in te_sds.values()) // 2
    assert set(alphas.values()) == {ALPHA}
    half, _, _ = kohya_to_peft(peft_to_kohya(unet_sd, te_sds, family, ALPHA, unet_config=pipe.unet.config),
                               family, pipe.unet.config)
    assert all(torch.allclose(half[k].float(), unet_sd[k], rtol=1e-3, atol=1e-4) for k in unet_sd)


def test_old_clip_layout_and_alpha_per_module(sd15):
    """transformers 4 keys (text_model. level) give the same kohya names; a per-module alpha is kept."""
    pipe, _, _, unet_sd, te_sds = sd15
    te = te_sds["text_encoder"]
    old = {"text_model." + k: v for k, v in te.items()}
    assert _modules(peft_to_kohya({}, {"text_encoder": old}, "sd15", 1.0)) == \
        _modules(peft_to_kohya({}, {"text_encoder": te}, "sd15", 1.0))
    one = next(iter(unet_sd)).rsplit(".lora_", 1)[0]
    alphas = {f"unet.{k.rsplit('.lora_', 1)[0]}": 3.0 for k in unet_sd}
    alphas.update({f"text_encoder.{k.rsplit('.lora_', 1)[0]}": 5.0 for k in te})
    alphas[f"unet.{one}"] = 0.1
    state = peft_to_kohya(unet_sd, te_sds, "sd15", alphas)
    assert state["lora_unet_" + one.replace(".", "_") + ".alpha"].item() == pytest.approx(0.1, abs=1e-8)
    _, _, back = kohya_to_peft(state, "sd15", pipe.unet.config)
    assert back[f"unet.{one}"] == pytest.approx(0.1, abs=1e-8)
    assert back[f"text_encoder.{next(iter(te)).rsplit('.lora_', 1)[0]}"] == 5.0


def test_unknown_key_is_an_error(sd15):
    pipe, _, _, unet_sd, te_sds = sd15
    state = peft_to_kohya(unet_sd, te_sds, "sd15", ALPHA)
    state["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="1 of its modules .*down_blocks_9"):
        kohya_to_peft(state, "sd15", pipe.unet.config)


def test_metadata_and_hash(sd15, tmp_path):
    _, _, _, unet_sd, te_sds = sd15
    meta = build_kohya_metadata(output_name="my_style", family="sd15", rank=RANK, alpha=ALPHA, resolution=512,
                                num_train_images=8, tag_frequency={"10_style": {"red": 3, "circle": 2}},
                                base_model_name="tiny-sd15", training_started_at=1700000000.5, steps=20, epoch=2)
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2.0")
    assert meta["ss_resolution"] == "(512, 512)" and meta["ss_num_train_images"] == "8"
    assert json.loads(meta["ss_tag_frequency"]) == {"10_style": {"red": 3, "circle": 2}}
    assert (meta["ss_steps"], meta["ss_epoch"], meta["ss_sd_model_name"]) == ("20", "2", "tiny-sd15")
    assert float(meta["ss_training_started_at"]) == 1700000000.5 and meta["ss_output_name"] == "my_style"
    xl = build_kohya_metadata(output_name="x", family="sdxl", rank=8, alpha=8, resolution=1024, num_train_images=1,
                              tag_frequency={}, base_model_name="b", training_started_at=0, steps=1, epoch=1)
    assert xl["ss_base_model_version"] == "sdxl_base_v1-0"
    assert xl["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    sd2 = build_kohya_metadata(output_name="x", family="sd2", rank=8, alpha=8, resolution=768, num_train_images=1,
                               tag_frequency={}, base_model_name="b", training_started_at=0, steps=1, epoch=1,
                               extra={"ss_v_parameterization": True})
    assert (sd2["ss_base_model_version"], sd2["ss_v2"], sd2["ss_v_parameterization"]) == ("sd_v2", "True", "True")

    state = peft_to_kohya(unet_sd, te_sds, "sd15", ALPHA)
    path = save_kohya_lora(tmp_path / "my_style.safetensors", state, meta)
    written = read_metadata(path)
    assert {k: written[k] for k in meta} == meta
    data = path.read_bytes()
    (header,) = struct.unpack("<Q", data[:8])
    assert written["sshs_model_hash"] == hashlib.sha256(data[8 + header:]).hexdigest() == model_hash(path)
    assert len(written["sshs_legacy_hash"]) == 8
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temporary file
    other = save_kohya_lora(tmp_path / "other.safetensors", state, {**meta, "ss_output_name": "renamed"})
    assert read_metadata(other)["sshs_model_hash"] == written["sshs_model_hash"]  # hash ignores metadata


@pytest.mark.parametrize("family", ["sd15", pytest.param("sdxl", marks=pytest.mark.slow)])
def test_kohya_file_reloads_to_trained_output(family, sd15, sdxl, tiny_sd15, tiny_sdxl, tmp_path):
    pipe, base, expected, unet_sd, te_sds = sd15 if family == "sd15" else sdxl
    assert np.abs(expected - base).max() > 0.1  # the LoRA really changes the image
    state = peft_to_kohya(unet_sd, te_sds, family, ALPHA, unet_config=pipe.unet.config)
    path = save_kohya_lora(tmp_path / f"{family}.safetensors", state, {"ss_output_name": family})
    report = check_export(tiny_sd15 if family == "sd15" else tiny_sdxl, family, path, expected_images=expected,
                          base_images=base, prompt=PROMPT, seed=SEED)
    assert report.max_diff < 2e-3  # fp16 storage of the LoRA weights only
    assert report.base_diff == 0.0 and report.self_base_diff == 0.0  # strength 0 is the base, exactly
    exact = save_kohya_lora(tmp_path / f"{family}32.safetensors",
                            peft_to_kohya(unet_sd, te_sds, family, ALPHA, unet_config=pipe.unet.config,
                                          dtype=torch.float32), {})
    report = check_export(tiny_sd15 if family == "sd15" else tiny_sdxl, family, exact, expected_images=expected,
                          base_images=base, prompt=PROMPT, seed=SEED)
    assert report.max_diff < 1e-5
