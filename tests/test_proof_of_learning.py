"""Proof of learning: a LoRA trained by the project's real trainer on a concept the miniature base does not
know moves what the model makes toward that concept, monotonically over strengths 0, 0.5 and 1; and with a
deliberately wrong objective the same assertion fails (a proof test that cannot fail proves nothing).

Images: the concept is ``zubi`` (the world's shapes on a pink background, which the base never drew); the
measure is how far the background of pictures rendered by the Testing tab's own code (the family's diffusers
pipeline and scheduler, the LoRA file loaded at each strength) is from that pink. Language model: the concept is an
answer format ("Hear ye! ..."), measured on questions about creatures the LoRA data never mentions.

What this guarantees: the objective, the timestep/noise handling, the conditioning and the export of each
family are right enough that 60-120 LoRA steps teach a concept. What it does not: picture quality at real
sizes, or the best settings for real models.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import run_job
from lora_studio.config import TrainConfig
from lora_studio.miniature import measure, world, world_text
from lora_studio.miniature.store import available, miniature_dir
from lora_studio.training.diffusion import training_target as right_target
from lora_studio.training.flux2 import flux2_velocity as right_flux2_velocity
from lora_studio.training.qwen_image import qwen_image_velocity as right_qwen_image_velocity

pytestmark = pytest.mark.slow

STRENGTHS = (0.0, 0.5, 1.0)
PROMPTS = [f"{world.CONCEPT_TRIGGER}, a red circle", f"{world.CONCEPT_TRIGGER}, a blue square",
           f"{world.CONCEPT_TRIGGER}, a green triangle", f"{world.CONCEPT_TRIGGER}, a yellow circle"]
SEEDS = (1, 2)
# The FLUX miniature's LoRA: the demo's settings without min-SNR (a DDPM weighting), at twice the learning rate.
FLUX_TRAIN = {"min_snr_gamma": None, "learning_rate": 2e-2}
# Z-Image and SD3: the same, with the noise levels their presets train with (a static shift of 3).
SHIFT_TRAIN = {**FLUX_TRAIN, "timestep_sampling": "shift", "discrete_flow_shift": 3.0}
# SD3's LoRA: 200 steps at the demo's learning rate (100 steps at 2e-2 reached 52, 200 at 2e-2 overshot to 81).
# Its miniature's and Z-Image's pictures are blotchy (pink mixed with white at strength 1, whatever the steps, rank
# or learning rate tried): their proofs accept a background within 55 (SD3) and 70 (Z-Image) of the pink, still far
# below what their wrong objectives reach (64 and over 190).
SD3_TRAIN = {**SHIFT_TRAIN, "learning_rate": 1e-2, "steps": 200}
Z_IMAGE_TRAIN = {**SD3_TRAIN, "steps": 300}
# Qwen-Image: the noise levels its presets train with (its scheduler's dynamic shift), 300 steps at 1e-2 (100 at
# 2e-2 reached 73, 200 at 2e-2 overshot to 136, 200 at 1e-2 reached 79).
QWEN_IMAGE_TRAIN = {**SD3_TRAIN, "timestep_sampling": "flux_shift", "steps": 300}


def _needs(family: str) -> Path:
    if family not in available():
        pytest.skip(f"the {family} miniature is not built")
    return miniature_dir(family)


# --- images ------------------------------------------------------------------------------------------------
def train_image_concept(base: Path, out: Path, steps: int = 100, save_steps: int = 0, **extra) -> Path:
    """Train a LoRA on the concept with the real TrainingJob (the demo's settings, and ``extra``); returns the
    LoRA file."""
    from lora_studio.ui.demo import DEMO_TRAIN

    data = world.write_dataset(out / "data", world.concept_scenes(12))
    settings = {k: DEMO_TRAIN[k] for k in ("lora_rank", "learning_rate", "batch_size", "min_snr_gamma",
                                           "lr_scheduler")}
    cfg = TrainConfig(base_model=str(base), train_data_dir=str(data), output_dir=str(out / "runs"), resolution=64,
                      max_train_steps=steps, save_steps=save_steps, mixed_precision="no", seed=7,
                      verify_export=False, **{**settings, **extra}).validate()
    job = run_job(cfg)
    assert job.status == "finished", job.error
    return job.run.path / "my_lora.safetensors"


@pytest.fixture(scope="module")
def sd15_concept_lora(tmp_path_factory) -> Path:
    """The concept LoRA on the sd15 miniature, with a checkpoint halfway (shared by two tests)."""
    return train_image_concept(_needs("sd15"), tmp_path_factory.mktemp("sd15_concept"), save_steps=50)


def concept_curve(base: Path, lora: Path, cfg: float = 5.0) -> list[float]:
    """Mean distance of the background to the concept's pink at each strength, over the prompts and seeds
    (the Testing tab's renderer, at guidance ``cfg``)."""
    from lora_studio.inference.grid import PipelineCache, RenderSettings, render_strengths

    cache = PipelineCache()
    totals = [0.0] * len(STRENGTHS)
    for prompt in PROMPTS:
        for seed in SEEDS:
            settings = RenderSettings(prompt, seed=seed, steps=20, cfg=cfg, width=64, height=64)
            for i, image in enumerate(render_strengths(str(base), lora, settings, STRENGTHS, cache=cache)):
                totals[i] += measure.concept_distance(image)
    cache.clear()
    return [round(t / (len(PROMPTS) * len(SEEDS)), 1) for t in totals]


def assert_learned_the_concept(curve: list[float], within: float = 50.0) -> None:
    """The base's backgrounds are far from pink (white is 97 away); at strength 1 they are pink (within ``within``
    and at most 60 % of the base's distance); 0.5 lies in between (monotonic)."""
    at0, half, at1 = curve
    assert at0 > 80, f"the base already draws the concept: {curve}"
    assert at1 < within and at1 < 0.6 * at0, \
        f"the LoRA did not move the pictures to the concept by a clear margin: {curve}"
    assert at0 > half > at1, f"not monotonic over strengths {STRENGTHS}: {curve}"


def negated_target(scheduler, prediction_type, latents, noise, timesteps):
    """A wrong objective: the opposite of the right target."""
    return -right_target(scheduler, prediction_type, latents, noise, timesteps)


def epsilon_target(scheduler, prediction_type, latents, noise, timesteps):
    """A wrong objective for a v-prediction model: predict the noise."""
    return noise


def flipped_velocity(latents, noise):
    """A wrong flow-matching objective: the velocity with its sign flipped (``latents - noise``)."""
    return latents - noise


def z_image_with_flux_sign(transformer, noisy, sigmas, embeds):
    """A wrong Z-Image objective: its output taken as the velocity itself, as FLUX's is (Z-Image predicts
    ``latent - noise``: the right function negates it)."""
    out = transformer(list(noisy.unsqueeze(2).unbind(0)), (1.0 - sigmas).to(noisy.dtype), embeds,
                      return_dict=False)[0]
    return torch.stack(out).squeeze(2)


def z_image_with_flux_time(transformer, noisy, sigmas, embeds):
    """A wrong Z-Image objective: the model shown ``sigma``, as FLUX's is (Z-Image's sees ``1 - sigma``)."""
    out = transformer(list(noisy.unsqueeze(2).unbind(0)), sigmas.to(noisy.dtype), embeds, return_dict=False)[0]
    return -torch.stack(out).squeeze(2)


def _proof(base: Path, tmp_path: Path, monkeypatch, wrong, right_lora: Path | None = None,
           hook: str = "lora_studio.training.diffusion.training_target", cfg: float = 5.0, within: float = 50.0,
           **train) -> None:
    """The right objective learns the concept; with ``hook`` replaced by ``wrong`` the same assertion fails
    (pictures rendered at guidance ``cfg``)."""
    right_lora = right_lora or train_image_concept(base, tmp_path / "right", **train)
    right_curve = concept_curve(base, right_lora, cfg)
    print(f"{base.name}: right objective {right_curve}")  # the measured margins (pytest -s shows them)
    assert_learned_the_concept(right_curve, within)
    monkeypatch.setattr(hook, wrong)
    wrong_curve = concept_curve(base, train_image_concept(base, tmp_path / "wrong", **train), cfg)
    print(f"{base.name}: {wrong.__name__} {wrong_curve}")
    with pytest.raises(AssertionError):
        assert_learned_the_concept(wrong_curve, within)


def test_epsilon_objective_learns_and_a_negated_target_does_not(sd15_concept_lora, tmp_path, monkeypatch):
    _proof(_needs("sd15"), tmp_path, monkeypatch, negated_target, right_lora=sd15_concept_lora)


def test_generate_command_draws_the_checkpoint_by_strength_grid(sd15_concept_lora, tmp_path):
    """``python -m lora_studio generate`` with the final LoRA and its checkpoint: one row each, and the
    background is nearer the concept's pink at strength 1 than at 0 in both rows (the Testing tab's grid is the
    same code)."""
    from PIL import Image

    from lora_studio.__main__ import main

    checkpoint = next(sd15_concept_lora.parent.glob("checkpoints/step_*/*.safetensors"))
    out = tmp_path / "grid.png"
    assert main(["generate", "--base", str(_needs("sd15")), "--lora", str(checkpoint), "--lora",
                 str(sd15_concept_lora), "--prompt", PROMPTS[0], "--strengths", "0,1", "--steps", "20",
                 "--cfg", "5", "--size", "64", "--seed", "1", "--out", str(out)]) == 0
    grid = Image.open(out)
    cell = 128  # cells are drawn at least 128 px; the labels sit above and to the left
    left, top = grid.width - 2 * cell, grid.height - 2 * cell
    distances = [[measure.concept_distance(grid.crop((left + c * cell, top + r * cell, left + (c + 1) * cell,
                                                         top + (r + 1) * cell))) for c in range(2)] for r in range(2)]
    assert all(row[1] < row[0] - 40 for row in distances), distances


def test_v_prediction_objective_learns_and_the_epsilon_target_does_not(tmp_path, monkeypatch):
    _proof(_needs("sd15_v"), tmp_path, monkeypatch, epsilon_target)


def test_sdxl_objective_learns_and_a_negated_target_does_not(tmp_path, monkeypatch):
    _proof(_needs("sdxl"), tmp_path, monkeypatch, negated_target)


def test_flow_matching_objective_learns_and_a_flipped_velocity_does_not(tmp_path, monkeypatch):
    """FLUX.1's rectified flow, through the FLUX trainer, FluxPipeline and its FlowMatchEulerDiscreteScheduler."""
    _proof(_needs("flux"), tmp_path, monkeypatch, flipped_velocity,
           hook="lora_studio.training.flow_matching.flow_target", **FLUX_TRAIN)


@pytest.fixture(scope="module")
def z_image_concept_lora(tmp_path_factory) -> Path:
    """The concept LoRA on the Z-Image miniature (shared by the two wrong conventions)."""
    return train_image_concept(_needs("z_image"), tmp_path_factory.mktemp("z_image_concept"), **Z_IMAGE_TRAIN)


@pytest.mark.parametrize("wrong", [z_image_with_flux_sign, z_image_with_flux_time], ids=["sign", "timestep"])
def test_z_image_objective_learns_and_flux_conventions_do_not(z_image_concept_lora, wrong, tmp_path, monkeypatch):
    """Z-Image through the Z-Image trainer, ZImagePipeline and its scheduler; its conventions differ from FLUX's in
    the sign of the output and the direction of time, and either one taken from FLUX fails the proof (rendered at
    the miniature's guidance, 2)."""
    from lora_studio.miniature.build_z_image import CFG

    _proof(_needs("z_image"), tmp_path, monkeypatch, wrong, right_lora=z_image_concept_lora,
           hook="lora_studio.training.z_image.z_image_velocity", cfg=CFG, within=70.0, **Z_IMAGE_TRAIN)


def sd3_with_unscaled_time(transformer, noisy, sigmas, embeds, pooled):
    """A wrong SD3 objective: the model shown ``sigma`` (FLUX's transformer scales it itself; SD3's expects the
    scheduler's ``1000 sigma``)."""
    dtype = noisy.dtype
    return transformer(hidden_states=noisy, timestep=sigmas.to(dtype), pooled_projections=pooled.to(dtype),
                       encoder_hidden_states=embeds.to(dtype), return_dict=False)[0]


@pytest.fixture(scope="module")
def sd3_concept_lora(tmp_path_factory) -> Path:
    """The concept LoRA on the SD3 miniature (shared by the two wrong objectives)."""
    return train_image_concept(_needs("sd3"), tmp_path_factory.mktemp("sd3_concept"), **SD3_TRAIN)


@pytest.mark.parametrize("wrong, hook", [
    (flipped_velocity, "lora_studio.training.flow_matching.flow_target"),
    (sd3_with_unscaled_time, "lora_studio.training.sd3.sd3_velocity")], ids=["sign", "timestep"])
def test_sd3_objective_learns_and_wrong_ones_do_not(sd3_concept_lora, wrong, hook, tmp_path, monkeypatch):
    """SD3's flow matching (timesteps 1000 sigma) through the SD3 trainer, StableDiffusion3Pipeline and its
    scheduler, at the miniature's guidance (2): the velocity's sign flipped, or the timesteps not scaled, fails."""
    from lora_studio.miniature.build_sd3 import CFG

    _proof(_needs("sd3"), tmp_path, monkeypatch, wrong, right_lora=sd3_concept_lora, hook=hook, cfg=CFG,
           within=55.0, **SD3_TRAIN)


def flux2_with_sd3_time(transformer, noisy, sigmas, embeds, guidance=None):
    """A wrong FLUX.2 objective: the model shown SD3's ``1000 sigma`` (FLUX.2's transformer scales ``sigma``
    itself)."""
    return right_flux2_velocity(transformer, noisy, sigmas * 1000, embeds, guidance)


@pytest.fixture(scope="module")
def flux2_concept_lora(tmp_path_factory) -> Path:
    """The concept LoRA on the FLUX.2 klein miniature (shared by the two wrong objectives)."""
    return train_image_concept(_needs("flux2"), tmp_path_factory.mktemp("flux2_concept"), **FLUX_TRAIN)


@pytest.mark.parametrize("wrong, hook", [
    (flipped_velocity, "lora_studio.training.flow_matching.flow_target"),
    (flux2_with_sd3_time, "lora_studio.training.flux2.flux2_velocity")], ids=["sign", "timestep"])
def test_flux2_objective_learns_and_wrong_ones_do_not(flux2_concept_lora, wrong, hook, tmp_path, monkeypatch):
    """FLUX.2 klein's flow matching through the FLUX.2 trainer, Flux2KleinPipeline and its scheduler, at the
    miniature's guidance (2) and prompt length: the velocity's sign flipped, or the timesteps scaled as SD3's, fails.
    (Training on latents not normalised by the VAE's batch-norm statistics still learns the concept here: 182, 43,
    29; this proof cannot catch that mistake.)"""
    from lora_studio.miniature.build_flux2 import CFG

    _proof(_needs("flux2"), tmp_path, monkeypatch, wrong, right_lora=flux2_concept_lora, hook=hook, cfg=CFG,
           **FLUX_TRAIN)


def qwen_image_with_z_image_time(transformer, noisy, sigmas, embeds, mask):
    """A wrong Qwen-Image objective: the model shown ``1 - sigma``, as Z-Image's is (Qwen-Image's sees ``sigma``)."""
    return right_qwen_image_velocity(transformer, noisy, 1.0 - sigmas, embeds, mask)


@pytest.fixture(scope="module")
def qwen_image_concept_lora(tmp_path_factory) -> Path:
    """The concept LoRA on the Qwen-Image miniature (shared by the two wrong objectives)."""
    return train_image_concept(_needs("qwen_image"), tmp_path_factory.mktemp("qwen_image_concept"), **QWEN_IMAGE_TRAIN)


@pytest.mark.parametrize("wrong, hook", [
    (flipped_velocity, "lora_studio.training.flow_matching.flow_target"),
    (qwen_image_with_z_image_time, "lora_studio.training.qwen_image.qwen_image_velocity")], ids=["sign", "timestep"])
def test_qwen_image_objective_learns_and_wrong_ones_do_not(qwen_image_concept_lora, wrong, hook, tmp_path,
                                                           monkeypatch):
    """Qwen-Image's flow matching through the Qwen-Image trainer (its causal VAE's normalised latents, its dynamic
    shift), QwenImagePipeline and its scheduler, at the miniature's true guidance (2, a blank negative prompt): the
    velocity's sign flipped, or the time direction of Z-Image, fails."""
    from lora_studio.miniature.build_qwen_image import CFG

    _proof(_needs("qwen_image"), tmp_path, monkeypatch, wrong, right_lora=qwen_image_concept_lora, hook=hook,
           cfg=CFG, **QWEN_IMAGE_TRAIN)


# --- the language model ------------------------------------------------------------------------------------
def train_llm_concept(base: Path, out: Path, steps: int = 60) -> Path:
    """A LoRA on every linear layer (the 96-wide miniature has too little room in q_proj/v_proj alone)."""
    data = world_text.write_concept_llm_data(out / "concept.jsonl")
    cfg = TrainConfig(base_model=str(base), train_data_dir=str(data), output_dir=str(out / "runs"), lora_rank=8,
                      target_modules=["all-linear"], learning_rate=5e-3, batch_size=8, max_train_steps=steps,
                      save_steps=0, mixed_precision="no", seed=7, lr_scheduler="constant",
                      verify_export=False).validate()
    job = run_job(cfg)
    assert job.status == "finished", job.error
    return job.run.path / cfg.output_name


def format_curve(base: Path, adapter: Path) -> tuple[list[float], list[list[str]]]:
    """Share of answers in the concept's format at each strength, on questions the LoRA data never asked."""
    from lora_studio.inference.llm_compare import LLMTester

    tester = LLMTester(str(base), adapter, device="cpu")
    questions = [q for q, _ in world_text.held_out_questions()][::2]  # 2 questions about each of 4 creatures
    answers = [[a.text for a in tester.compare(q, STRENGTHS, max_new_tokens=16)] for q in questions]
    shares = [sum(row[i].startswith(world_text.CONCEPT_PREFIX) for row in answers) / len(answers)
              for i in range(len(STRENGTHS))]
    return shares, answers


def assert_learned_the_format(shares: list[float], answers: list[list[str]]) -> None:
    at0, half, at1 = shares
    assert at0 == 0, f"the base already answers in the format: {answers[:3]}"
    assert at1 >= 0.75, f"the LoRA did not teach the format: {shares}, {answers[:3]}"
    assert at0 <= half <= at1, f"not monotonic over strengths {STRENGTHS}: {shares}"


def test_llm_objective_learns_an_answer_format_and_shifted_labels_do_not(tmp_path, monkeypatch):
    import lora_studio.training.llm as llm

    base = _needs("llm")
    assert_learned_the_format(*format_curve(base, train_llm_concept(base, tmp_path / "right")))
    right_loss = llm.causal_lm_loss

    def shifted_labels(model, inputs, mode="labels"):
        """A wrong objective: each position learns the token after the next one (an off-by-one)."""
        labels = inputs["labels"]
        wrong = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        return right_loss(model, {**inputs, "labels": wrong}, mode)

    monkeypatch.setattr(llm, "causal_lm_loss", shifted_labels)
    shares, answers = format_curve(base, train_llm_concept(base, tmp_path / "wrong"))
    with pytest.raises(AssertionError):
        assert_learned_the_format(shares, answers)
