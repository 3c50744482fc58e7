"""``--demo`` offers every image miniature that is built (a tiny random model for one that is not), and each
family gets its own demo settings: picking one of its models in the Training tab sets its family's training
settings, in the Testing tab its steps and guidance."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from lora_studio.config import TrainConfig
from lora_studio.miniature.store import available
from lora_studio.models.detect import detect_family
from lora_studio.ui.demo import (DEMO_FAMILIES, DEMO_TRAIN, build_demo, demo_render_settings, demo_train_settings)

FLOW = ("flux", "flux2", "z_image", "sd3")
# What the family detection calls each demo model (the v-prediction SD1.x miniature reads as an SD2.x model).
DETECTED = {"sd15_v": "sd2"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def context(demo, tmp_path_factory):
    from lora_studio.ui.context import StudioContext

    root = tmp_path_factory.mktemp("studio")
    return StudioContext(outputs=root / "outputs", models_dir=root / "models", demo=demo)


def test_the_demo_offers_every_image_miniature(demo, context):
    built = available()
    assert {"sd15", "flux", "z_image", "sd3", "flux2"} <= set(built)  # committed miniatures
    choices = context.model_choices()
    assert choices[:2] == [str(demo.model), str(demo.llm_model)]
    for family in DEMO_FAMILIES:
        path = demo.models[family]
        assert path.name == (f"miniature-{family}" if family in built else f"tiny-{family}")
        assert (family in demo.miniatures) == (family in built)
        assert detect_family(str(path)) == DETECTED.get(family, family), family
        assert str(path) in choices
        assert demo.family_of(str(path)) == family
        assert demo.family_of(f"{path}/") == family  # as typed, with a trailing slash
    assert demo.family_of(str(demo.llm_model)) is None and demo.family_of("") is None
    assert demo.flux_model == demo.models["flux"] and demo.qwen_image_model == demo.models["qwen_image"]


def _train_handlers(demo):
    """The Training tab's handlers with a form of every config field (no page needed)."""
    from lora_studio.ui.train_form import SPECIAL_FIELDS
    from lora_studio.ui.train_tab import FAMILY_GROUPS, _Handlers

    form = {f.name: None for f in dataclasses.fields(TrainConfig) if f.name not in SPECIAL_FIELDS}
    ctx = SimpleNamespace(demo=demo)
    handlers = _Handlers(ctx, SimpleNamespace(demo=demo, gpu_gb=None), SimpleNamespace(form=form))
    return handlers, 3 + len(FAMILY_GROUPS)


def _form_after_picking(handlers, skip_first: int, base_model: str) -> TrainConfig:
    from lora_studio.ui.train_form import form_to_config

    values = handlers.on_model_change(base_model, "auto", [])[skip_first:]
    assert len(values) == len(handlers.demo_fields)
    return form_to_config(handlers.demo_fields, values)


def test_picking_a_flow_family_in_the_demo_gives_its_demo_settings(demo):
    handlers, skip = _train_handlers(demo)
    assert {"min_snr_gamma", "learning_rate", "max_train_steps", "timestep_sampling"} <= set(handlers.demo_fields)
    z_image = _form_after_picking(handlers, skip, str(demo.models["z_image"]))
    assert (z_image.min_snr_gamma, z_image.max_train_steps, z_image.timestep_sampling,
            z_image.discrete_flow_shift) == (None, 300, "shift", 3.0)
    flux = _form_after_picking(handlers, skip, str(demo.models["flux"]))
    # FLUX puts back what Z-Image changed: no min-SNR (a DDPM weighting), 2e-2, the default noise levels.
    assert (flux.min_snr_gamma, flux.learning_rate, flux.max_train_steps, flux.timestep_sampling) == \
        (None, 2e-2, 100, TrainConfig().timestep_sampling)
    sd15 = _form_after_picking(handlers, skip, str(demo.model))
    assert (sd15.min_snr_gamma, sd15.learning_rate) == (DEMO_TRAIN["min_snr_gamma"], DEMO_TRAIN["learning_rate"])
    # Another model keeps whatever the form holds.
    import gradio as gr

    others = handlers.on_model_change(str(demo.llm_model), "auto", [])[skip:]
    assert list(others) == [gr.skip()] * len(handlers.demo_fields)


def test_every_demo_family_has_settings_a_trainer_accepts(demo):
    for family in DEMO_FAMILIES:
        cfg = TrainConfig(base_model=str(demo.models[family]), train_data_dir=str(demo.images),
                          **demo_train_settings(family)).validate()
        assert cfg.max_train_steps <= 300
        if family in FLOW:
            assert cfg.min_snr_gamma is None, f"{family}: min-SNR is a DDPM weighting"


def test_the_testing_tab_takes_each_demo_familys_steps_and_guidance(demo, context):
    from lora_studio.ui.test_tab import _steps_and_cfg_for

    for family in ("z_image", "sd3", "flux2"):
        assert _steps_and_cfg_for(context, str(demo.models[family])) == (20, 2.0)
    # The FLUX miniature is rendered as its proof renders it, not with FLUX.1-dev's 28 steps at 3.5.
    assert _steps_and_cfg_for(context, str(demo.models["flux"])) == (20, 5.0)
    assert demo_render_settings("sd15") == demo.render


def test_the_proofs_of_learning_train_with_the_demo_settings():
    """The slow proof-of-learning tests measure what the demo's flow settings teach (their learning rate, steps
    and noise levels), so the demo's strength grid moves as the proofs record."""
    import test_proof_of_learning as proofs

    for family, proof in (("flux", proofs.FLUX_TRAIN), ("flux2", proofs.FLUX_TRAIN), ("z_image", proofs.Z_IMAGE_TRAIN),
                          ("sd3", proofs.SD3_TRAIN), ("qwen_image", proofs.QWEN_IMAGE_TRAIN)):
        settings = demo_train_settings(family)
        expected = {("max_train_steps" if k == "steps" else k): v for k, v in proof.items()}
        expected.setdefault("max_train_steps", 100)
        assert {k: settings[k] for k in expected} == expected, family


def test_without_the_miniatures_the_demo_offers_tiny_random_models(tmp_path, monkeypatch):
    monkeypatch.setattr("lora_studio.miniature.store.available", lambda: [])
    demo = build_demo(tmp_path / "demo")
    assert demo.miniatures == () and not demo.miniature
    for family, path in demo.models.items():
        assert path.name == f"tiny-{family}"
        assert detect_family(str(path)) == DETECTED.get(family, family), family
