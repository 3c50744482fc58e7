"""Network types (lora, dora, lokr, loha): the exported LyCORIS/kohya tensors give the weights AUTOMATIC1111/Forge
and ComfyUI compute from them (their formulas, restated below from ComfyUI's comfy/weight_adapter: lora.py,
loha.py, lokr.py and base.weight_decompose), at strength 1, 0.5 and 0; the files convert back; the export check
loads them into a fresh pipeline through PEFT."""

from __future__ import annotations

import pytest
import torch
from peft.utils import get_peft_model_state_dict

from lora_studio.export.kohya import kohya_to_peft, peft_to_kohya, save_kohya_lora
from lora_studio.export.lora_state import by_module
from lora_studio.networks import add_network, peft_config, set_strength

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
MODULE = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
ALPHA = 3.0


def tool_weight(w: torch.Tensor, t: dict[str, torch.Tensor], strength: float) -> torch.Tensor:
    """The weight ComfyUI (and A1111's LyCORIS support) builds from one module's kohya tensors."""
    w = w.float()
    alpha = float(t["alpha"])
    if "lora_up.weight" in t:
        up, down = t["lora_up.weight"].float(), t["lora_down.weight"].float()
        scale, diff = alpha / down.shape[0], (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    elif "hada_w1_a" in t:
        scale = alpha / t["hada_w1_b"].shape[0]
        diff = ((t["hada_w1_a"].float() @ t["hada_w1_b"].float())
                * (t["hada_w2_a"].float() @ t["hada_w2_b"].float())).reshape(w.shape)
    else:
        w1, w2, dim = t.get("lokr_w1"), t.get("lokr_w2"), None
        if w2 is None:
            dim, w2 = t["lokr_w2_b"].shape[0], t["lokr_w2_a"].float() @ t["lokr_w2_b"].float()
        scale = alpha / dim if dim is not None else 1.0  # both factors full: the tools ignore alpha
        diff = torch.kron(w1.float(), w2.float()).reshape(w.shape)
    if "dora_scale" in t:  # weight_decompose: the norm of each input column of W + scale * diff
        calc = w + scale * diff
        norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True).transpose(0, 1)
        return w + strength * (calc * (t["dora_scale"].float() / norm) - w)
    return w + strength * scale * diff


def trained_unet(tiny_sd15, kind: str, rank: int):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd15 / "unet")
    add_network(unet, kind, peft_config(kind, rank, ALPHA, TARGETS))
    torch.manual_seed(0)
    with torch.no_grad():  # stand-in for training: every adapter weight moves
        for p in unet.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    return unet


@pytest.mark.parametrize("kind, rank, names", [
    ("lora", 4, {"lora_down.weight", "lora_up.weight", "alpha"}),
    ("dora", 4, {"lora_down.weight", "lora_up.weight", "dora_scale", "alpha"}),
    ("lokr", 4, {"lokr_w1", "lokr_w2", "alpha"}),  # 32 = 4 x 8 on the tiny UNet: both factors full
    ("lokr", 2, {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}),
    ("loha", 4, {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}),
])
def test_exported_tensors_give_what_the_tools_compute(tiny_sd15, kind, rank, names):
    unet = trained_unet(tiny_sd15, kind, rank)
    state = peft_to_kohya(get_peft_model_state_dict(unet), {}, "sd15", ALPHA, rank=rank, dtype=torch.float32)
    prefix = "lora_unet_" + MODULE.replace(".", "_") + "."
    tensors = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    assert set(tensors) == names
    if kind == "dora":
        assert tensors["dora_scale"].shape == (1, 32) and tensors["dora_scale"].dtype == torch.float32
    layer = unet.get_submodule(MODULE)
    base = layer.get_base_layer()
    x = torch.randn(5, base.in_features)
    for strength in (1.0, 0.5, 0.0):
        set_strength(unet, "default", strength)
        with torch.no_grad():
            ours = layer(x)
            tools = torch.nn.functional.linear(x, tool_weight(base.weight, tensors, strength), base.bias)
        torch.testing.assert_close(ours, tools, atol=2e-5, rtol=1e-5)
        if strength == 0:
            assert torch.equal(ours, base(x))  # strength 0 is the base exactly


@pytest.mark.parametrize("kind, rank", [("dora", 4), ("lokr", 4), ("lokr", 2), ("loha", 4)])
def test_kohya_file_converts_back_with_the_same_effect(tiny_sd15, kind, rank):
    from lora_studio.export.lora_state import _model_scale

    unet = trained_unet(tiny_sd15, kind, rank)
    peft = get_peft_model_state_dict(unet)
    back, _, alphas = kohya_to_peft(peft_to_kohya(peft, {}, "sd15", ALPHA, rank=rank, dtype=torch.float32),
                                    "sd15", unet.config)
    assert set(back) == set(peft)
    for module, tensors in by_module(back).items():
        from lora_studio.export.kohya import lokr_is_full, module_rank

        file_scale = alphas[f"unet.{module}"] / module_rank(tensors)
        run_scale = _model_scale(unet, module, tensors)
        if kind == "lokr" and lokr_is_full(tensors):  # alpha / rank folded into lokr_w2, scale 1 in the file
            assert file_scale == 1.0
            torch.testing.assert_close(tensors["lokr_w2"] / run_scale, peft[f"{module}.lokr_w2"])
        else:
            assert file_scale == pytest.approx(run_scale)
            for suffix, value in tensors.items():
                torch.testing.assert_close(value, peft[f"{module}.{suffix}"])


@pytest.mark.parametrize("kind", ["dora", "lokr", "loha"])
@pytest.mark.slow
def test_export_check_loads_the_file_through_peft(tiny_sd15, tmp_path, kind):
    """The written file, loaded into a fresh pipeline, reproduces the in-memory model; strength 0 is the base."""
    from diffusers import StableDiffusionPipeline

    from lora_studio.export.lycoris import file_network_type
    from lora_studio.export.verify import check_export, render

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    add_network(pipe.unet, kind, peft_config(kind, 4, ALPHA, TARGETS))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    expected = render(pipe, "a red circle", 3)
    pipe.unet.disable_adapters()
    base = render(pipe, "a red circle", 3)
    pipe.unet.enable_adapters()
    path = save_kohya_lora(tmp_path / f"{kind}.safetensors",
                           peft_to_kohya(get_peft_model_state_dict(pipe.unet), {}, "sd15", ALPHA, rank=4), {})
    assert file_network_type(path) == kind
    report = check_export(tiny_sd15, "sd15", path, expected_images=expected, base_images=base, prompt="a red circle",
                          seed=3)
    assert report.passed and report.effect > 10 * report.max_diff, report


def test_language_models_take_lora_or_dora_only(tmp_path):
    from lora_studio.config import TrainConfig
    from lora_studio.errors import ConfigError
    from lora_studio.training.llm import LLMTrainer

    trainer = LLMTrainer.__new__(LLMTrainer)
    trainer.config = TrainConfig(network_type="lokr")
    with pytest.raises(ConfigError, match="lora or dora"):
        trainer._add_lora(None)
