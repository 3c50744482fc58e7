"""Family detection, presets by memory size, the memory estimate, and the auto_fit step-down on out-of-memory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from lora_studio.config import TrainConfig
from lora_studio.errors import ModelLoadError
from lora_studio.models.detect import detect_family, resolve_family
from lora_studio.presets import list_presets, recommend_preset
from lora_studio.training.memory import check_fits, estimate_breakdown, estimate_memory, next_step_down

ROOT = Path(__file__).resolve().parent.parent


# --- family detection ---------------------------------------------------------------------------------
def _diffusers_folder(root: Path, cls: str, components: dict, unet: dict | None = None,
                      scheduler: dict | None = None) -> Path:
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": cls, **components}))
    for name, cfg in (("unet/config.json", unet), ("scheduler/scheduler_config.json", scheduler)):
        if cfg is not None:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(json.dumps(cfg))
    return root


SD = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
      "text_encoder": ["transformers", "CLIPTextModel"], "scheduler": ["diffusers", "PNDMScheduler"]}


def test_detects_sd1_sd2_sdxl_and_llm_folders(tmp_path, tiny_sdxl, tiny_sd15):
    sd1 = _diffusers_folder(tmp_path / "sd1", "StableDiffusionPipeline", SD, {"cross_attention_dim": 768},
                            {"prediction_type": "epsilon"})
    sd2v = _diffusers_folder(tmp_path / "sd2", "StableDiffusionPipeline", SD, {"cross_attention_dim": 1024},
                             {"prediction_type": "v_prediction"})
    sd2_base = _diffusers_folder(tmp_path / "sd2b", "StableDiffusionPipeline", SD, {"cross_attention_dim": 1024},
                                 {"prediction_type": "epsilon"})
    xl = _diffusers_folder(tmp_path / "xl", "StableDiffusionXLPipeline",
                           {**SD, "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]})
    llm = tmp_path / "llm"
    llm.mkdir()
    (llm / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    assert [detect_family(str(p)) for p in (sd1, sd2v, sd2_base, xl, llm)] == ["sd15", "sd2", "sd2", "sdxl", "llm"]
    assert detect_family(str(tiny_sdxl)) == "sdxl" and detect_family(str(tiny_sd15)) == "sd15"

    from lora_studio.models.detect import family_info

    info = family_info(str(sd2v))
    assert (info.family, info.prediction_type, info.default_resolution) == ("sd2", "v_prediction", 768)
    assert info.presets == [p.name for p in list_presets("sd15")]  # SD2 uses the SD1.x presets
    xl_info = family_info(str(tiny_sdxl))
    assert xl_info.presets == ["sdxl_12gb", "sdxl_16gb", "sdxl_24gb"] and xl_info.default_resolution == 1024
    assert xl_info.recommended_preset(16.0) == "sdxl_16gb"


def test_unsupported_folders_are_named(tmp_path):
    refiner = _diffusers_folder(tmp_path / "refiner", "StableDiffusionXLImg2ImgPipeline",
                                {**SD, "text_encoder": [None, None], "text_encoder_2": ["transformers", "X"]})
    with pytest.raises(ModelLoadError, match="SDXL refiner"):
        detect_family(str(refiner))
    hunyuan = _diffusers_folder(tmp_path / "hunyuan", "HunyuanDiTPipeline", {"transformer": ["diffusers", "X"],
                                                                               "vae": ["diffusers", "AutoencoderKL"]})
    with pytest.raises(ModelLoadError, match="HunyuanDiTPipeline"):
        detect_family(str(hunyuan))
    sd3 = _diffusers_folder(tmp_path / "sd3", "StableDiffusion3Pipeline", {"transformer": ["diffusers", "X"],
                                                                           "vae": ["diffusers", "AutoencoderKL"]})
    assert detect_family(str(sd3)) == "sd3"  # trained since issue 15 (tests/test_sd3.py)
    flux = _diffusers_folder(tmp_path / "flux", "FluxPipeline", {"transformer": ["diffusers", "X"],
                                                                 "vae": ["diffusers", "AutoencoderKL"]})
    assert detect_family(str(flux)) == "flux"  # trained since FLUX support (tests/test_flux.py)


def _single_file(path: Path, keys: list[str]) -> Path:
    from safetensors.torch import save_file

    save_file({k: torch.zeros(1) for k in keys}, str(path))
    return path


UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"


@pytest.mark.parametrize("keys, family", [
    ([UNET_KEY, "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"], "sd15"),
    ([UNET_KEY, "cond_stage_model.model.token_embedding.weight"], "sd2"),
    ([UNET_KEY, "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
      "conditioner.embedders.1.model.token_embedding.weight"], "sdxl"),
])
def test_detects_single_file_checkpoints(tmp_path, keys, family):
    assert detect_family(str(_single_file(tmp_path / "model.safetensors", keys))) == family


def test_detects_ckpt_files_and_names_wrong_single_files(tmp_path):
    ckpt = tmp_path / "xl.ckpt"
    torch.save({"state_dict": {UNET_KEY: torch.zeros(1), "conditioner.embedders.1.model.ln_final.weight":
                               torch.zeros(1)}}, ckpt)
    assert detect_family(str(ckpt)) == "sdxl"
    refiner = _single_file(tmp_path / "refiner.safetensors",
                           [UNET_KEY, "conditioner.embedders.0.model.ln_final.weight"])
    with pytest.raises(ModelLoadError, match="refiner"):
        detect_family(str(refiner))
    llm = _single_file(tmp_path / "llama.safetensors", ["model.layers.0.self_attn.q_proj.weight"])
    with pytest.raises(ModelLoadError, match="language-model weights"):
        detect_family(str(llm))


def test_family_mismatch_is_a_clear_message(tiny_sdxl):
    with pytest.raises(ModelLoadError, match="model_family is 'sd15' but .* is a SDXL"):
        resolve_family("sd15", str(tiny_sdxl))
    assert resolve_family("sdxl", str(tiny_sdxl)) == "sdxl"


# --- presets by memory size -----------------------------------------------------------------------------
def test_sdxl_presets_are_chosen_by_memory_and_fit_their_budget_by_estimate():
    names = [p.name for p in list_presets("sdxl")]
    assert names == ["sdxl_12gb", "sdxl_16gb", "sdxl_24gb"]
    assert recommend_preset(11.6, "sdxl").name == "sdxl_12gb"  # a 12 GB card reports a little less
    assert recommend_preset(16.0, "sdxl").name == "sdxl_16gb"
    assert recommend_preset(23.6, "sdxl").name == "sdxl_24gb"
    assert recommend_preset(80.0, "sdxl").name == "sdxl_24gb"
    assert recommend_preset(8.0, "sdxl").name == "sdxl_12gb"  # the smallest, when nothing fits
    for p in list_presets("sdxl"):
        cfg = TrainConfig().replace(**p.values)
        assert p.family == "sdxl" and cfg.resolution == 1024 and cfg.auto_fit
        assert estimate_memory(cfg, "sdxl") <= 0.9 * p.vram_gb, p.name  # the goal, until measured on a GPU
        assert "not yet measured" in p.description


# --- the estimate -------------------------------------------------------------------------------------
def test_estimate_grows_with_batch_and_resolution_and_shrinks_with_checkpointing():
    base = TrainConfig(mixed_precision="fp16", resolution=1024, batch_size=2)
    est = estimate_memory(base, "sdxl")
    assert estimate_memory(base.replace(batch_size=4), "sdxl") > est
    assert estimate_memory(base.replace(resolution=1280), "sdxl") > est
    assert estimate_memory(base.replace(gradient_checkpointing=True), "sdxl") < est
    assert estimate_memory(base.replace(optimizer="adamw8bit"), "sdxl") < est
    assert estimate_memory(base.replace(mixed_precision="no"), "sdxl") > est
    assert estimate_memory(base.replace(train_text_encoder=True), "sdxl") > est
    sd15 = TrainConfig(resolution=512, batch_size=2)
    assert estimate_memory(sd15, "sd15") < estimate_memory(sd15.replace(resolution=1024), "sdxl")
    parts = estimate_breakdown(base, "sdxl").parts
    assert parts["UNet weights"] == pytest.approx(5.13, abs=0.01)  # 2.57 B parameters in fp16
    assert parts["text encoder weights"] == 0  # SDXL's frozen encoders leave the GPU after caching
    assert estimate_breakdown(sd15, "sd15").parts["text encoder weights"] > 0


def test_llm_estimate_follows_sequence_length_and_4bit(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256}))
    cfg = TrainConfig(base_model=str(tmp_path), max_seq_length=1024, gradient_checkpointing=True,
                      mixed_precision="bf16")
    full = estimate_memory(cfg, "llm")
    assert 15 < full < 22  # an 8B model in bf16: about 16 GB of weights
    assert 5 < estimate_memory(cfg.replace(load_in_4bit=True), "llm") < 10  # QLoRA: 4-bit layers, bf16 embeddings
    assert estimate_memory(cfg.replace(max_seq_length=4096), "llm") > full


def test_check_fits_warns_with_the_preset_and_is_quiet_when_it_fits():
    big = TrainConfig(mixed_precision="fp16", resolution=1024, batch_size=4)
    warning = check_fits(big, "sdxl", 12.0)
    assert warning and "sdxl_12gb" in warning and "auto_fit" in warning and "estimated peak" in warning
    assert check_fits(big.replace(gradient_checkpointing=True, batch_size=2), "sdxl", 12.0) is None
    assert check_fits(big, "sdxl", None) is None


# --- auto_fit step-down -------------------------------------------------------------------------------
def test_step_down_sequence_batch_then_checkpointing_then_8bit_then_resolution():
    cfg = TrainConfig(batch_size=4, resolution=1024, gradient_checkpointing=False, optimizer="adamw")
    seen, changes, resumable = cfg, [], []
    while (step := next_step_down(seen, "sdxl")) is not None:
        seen = step.config
        changes.append(step.change)
        resumable.append(step.resumable)
    assert resumable.count(True) == 1 and changes[resumable.index(True)] == "gradient_checkpointing off -> on"
    assert changes[0].startswith("batch_size 4 -> 2 (gradient_accumulation_steps 1 -> 2")
    assert changes[1].startswith("batch_size 2 -> 1 (gradient_accumulation_steps 2 -> 4")
    assert changes[2:4] == ["gradient_checkpointing off -> on", "optimizer adamw -> adamw8bit"]
    assert changes[4:] == ["resolution 1024 -> 896", "resolution 896 -> 768", "resolution 768 -> 640",
                           "resolution 640 -> 512"]
    assert cfg.batch_size == 4 and not cfg.gradient_checkpointing  # pure: the input is unchanged
    assert seen.batch_size * seen.gradient_accumulation_steps == 4  # the effective batch is kept
    assert next_step_down(TrainConfig(batch_size=6), "sd15")[0].batch_size == 3
    assert next_step_down(TrainConfig(batch_size=5), "sd15")[0].gradient_accumulation_steps == 5
    llm = TrainConfig(gradient_checkpointing=True, optimizer="adamw8bit", max_seq_length=512)
    assert next_step_down(llm, "llm")[1] == "load_in_4bit off -> on (QLoRA)"
    assert next_step_down(llm.replace(load_in_4bit=True), "llm")[1] == "max_seq_length 512 -> 256"


def _sd15_config(model: Path, data: Path, out: Path, **kw) -> TrainConfig:
    values = dict(base_model=str(model), train_data_dir=str(data), output_dir=str(out), resolution=64, lora_rank=4,
                  batch_size=4, max_train_steps=4, save_steps=0, mixed_precision="no", verify_export=False, seed=1)
    values.update(kw)
    return TrainConfig(**values).validate()


@pytest.fixture()
def oom_when_batched(monkeypatch):
    """Any batch larger than 1 runs 'out of GPU memory', as a too-large batch on a real card does."""
    from lora_studio.training.diffusion import DiffusionTrainer

    real = DiffusionTrainer.compute_loss

    def compute_loss(self, batch):
        if self.config.batch_size > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, batch)

    monkeypatch.setattr(DiffusionTrainer, "compute_loss", compute_loss)


def _run(cfg: TrainConfig):
    from lora_studio.training.job import TrainingJob

    job = TrainingJob(cfg).start()
    assert job.wait(600)
    return job


@pytest.mark.slow
def test_auto_fit_steps_down_until_the_run_finishes(tiny_sd15, demo_images, tmp_path, oom_when_batched):
    job = _run(_sd15_config(tiny_sd15, demo_images, tmp_path / "out", auto_fit=True, batch_size=2))
    assert job.status == "finished", job.error
    log = "\n".join(job.snapshot().log)
    assert "auto_fit steps down (batch_size 2 -> 1 (gradient_accumulation_steps 1 -> 2" in log
    assert "restarting from step 0" in log
    saved = job.run.load_config()
    assert (saved.batch_size, saved.gradient_accumulation_steps) == (1, 2)  # the run folder keeps what fit
    assert job.run.read_state()["auto_fit_steps"] == [
        "batch_size 2 -> 1 (gradient_accumulation_steps 1 -> 2, same effective batch)"]
    assert [m["step"] for m in job.run.read_metrics()] == [1, 2, 3, 4]


def test_with_several_processes_auto_fit_stops_them_all_with_the_step(tiny_sd15, demo_images, tmp_path,
                                                                       oom_when_batched, monkeypatch):
    """Under accelerate launch one process cannot retry alone (the others wait in the all-reduce): the run
    stops, naming the step auto_fit would have taken, and the launcher ends the other processes."""
    from lora_studio.training import job as job_module

    monkeypatch.setattr(job_module, "is_distributed", lambda: True)  # this process as one of several
    job = _run(_sd15_config(tiny_sd15, demo_images, tmp_path / "out", auto_fit=True, batch_size=2))
    assert job.status == "failed"
    assert "With several GPUs auto_fit cannot step down" in job.error
    assert "Start the run again with batch_size 2 -> 1" in job.error
    assert job.run.load_config().batch_size == 2  # nothing was stepped down


def test_without_auto_fit_the_run_stops_naming_the_next_preset(tiny_sd15, demo_images, tmp_path, oom_when_batched):
    job = _run(_sd15_config(tiny_sd15, demo_images, tmp_path / "out"))
    assert job.status == "failed"
    assert "ran out of memory" in job.error and "Try the preset '" in job.error and "auto_fit: true" in job.error


@pytest.mark.slow
def test_checkpointing_step_down_resumes_from_the_last_checkpoint(tiny_sd15, demo_images, tmp_path, monkeypatch):
    from lora_studio.training.diffusion import DiffusionTrainer

    real, calls = DiffusionTrainer.compute_loss, {"n": 0}

    def compute_loss(self, batch):
        calls["n"] += 1
        if calls["n"] == 5 and not self.config.gradient_checkpointing:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
        return real(self, batch)

    monkeypatch.setattr(DiffusionTrainer, "compute_loss", compute_loss)
    job = _run(_sd15_config(tiny_sd15, demo_images, tmp_path / "out", batch_size=1, max_train_steps=6, save_steps=2,
                            auto_fit=True))
    assert job.status == "finished", job.error
    log = "\n".join(job.snapshot().log)
    assert "gradient_checkpointing off -> on) and tries again, resuming from the last checkpoint" in log
    assert "Resumed from checkpoint at step 4" in log
    assert [m["step"] for m in job.run.read_metrics()] == [1, 2, 3, 4, 5, 6]


def test_8bit_adamw_falls_back_to_adamw_with_a_warning_without_cuda():
    from lora_studio.training.optimizers import build_optimizer

    said = []
    opt = build_optimizer(TrainConfig(optimizer="adamw8bit"), [{"params": [torch.nn.Parameter(torch.zeros(2))]}],
                          say=lambda msg, level="info": said.append((level, msg)))
    if torch.cuda.is_available():
        pytest.skip("CUDA present: bitsandbytes may be used")
    assert type(opt) is torch.optim.AdamW
    assert said and said[0][0] == "warning" and "AdamW" in said[0][1]


# --- the benchmark's CPU path and the estimate's constants ---------------------------------------------
@pytest.mark.slow
def test_bench_memory_counts_activations_and_runs_small_shapes(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_memory

    small = bench_memory.SMALL_CONFIGS["sdxl"]
    one = bench_memory.count_activations("sdxl", 128, 1, config=small)
    two = bench_memory.count_activations("sdxl", 128, 2, config=small)
    assert 0 < one.checkpointed_bytes < one.full_bytes < two.full_bytes
    assert bench_memory.main(["--cpu", "--steps", "1", "--presets", "12gb,sdxl_24gb"]) == 0
    out = capsys.readouterr().out
    assert "| sdxl_24gb |" in out and "| 12gb |" in out and "Device: CPU" in out


def test_sd15_activation_constant_matches_the_count():
    """memory.py's SD1.5 figure is what the meta-device count gives for this diffusers/torch (rerun --count)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_memory

    from lora_studio.training.memory import FIGURES

    full, ckpt = bench_memory.count_activations("sd15", 512, 1).per_megapixel()
    assert full / 1e6 == pytest.approx(FIGURES["sd15"].act_mb_per_mp["half"], rel=0.05)
    assert ckpt / 1e6 == pytest.approx(FIGURES["sd15"].act_mb_per_mp["half_ckpt"], rel=0.05)


def test_vae_caching_constant_matches_the_measurement():
    """memory.py's VAE figure is the encoder's live peak measured on the meta device (rerun --peak)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_memory

    from lora_studio.training.memory import VAE_ENCODE_GB_PER_MP

    per_mp = bench_memory.measure_vae_encode_peak(512, 1, torch.float32) / 1e9 / (512 * 512 / 1e6)
    assert per_mp == pytest.approx(VAE_ENCODE_GB_PER_MP, rel=0.05)
    half = bench_memory.measure_vae_encode_peak(512, 2, torch.float16) / 1e9 / (2 * 512 * 512 / 1e6)
    assert half == pytest.approx(VAE_ENCODE_GB_PER_MP / 2, rel=0.05)


@pytest.mark.slow
def test_estimate_covers_the_measured_live_peak_of_a_real_step():
    """The 12 GB preset's step on the full-size SD1.5 UNet (meta device, bench_memory --peak): the estimate of
    the same parts (everything but CUDA context and workspace) must not be below the measured peak, and not
    far above it (the 15% allocator margin)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_memory

    ((name, peak, measured, estimate),) = bench_memory.report_peaks(say=lambda line: None, only={"12gb"})
    assert name == "12gb" and peak.checkpointing and peak.batch == 2
    assert 1.0 <= estimate / measured <= 1.2, (estimate, measured)
    small = bench_memory.SMALL_CONFIGS["sd15"]
    full = bench_memory.measure_step_peak("sd15", 128, 2, False, config=small)
    ckpt = bench_memory.measure_step_peak("sd15", 128, 2, True, config=small)
    saved = bench_memory.count_activations("sd15", 128, 2, config=small).full_bytes
    assert ckpt.step_peak_bytes < full.step_peak_bytes and full.step_peak_bytes >= saved


def test_llm_estimate_covers_the_measured_step(tmp_path):
    """An LLM step measured on the meta device (bench_memory --peak): the estimate's step part is above it,
    with and without checkpointing, and not far above (a smaller Llama shape, so it takes seconds)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_memory

    from lora_studio.training.memory import estimate_breakdown

    shape = dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=8, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=32000)
    (tmp_path / "config.json").write_text(json.dumps({**shape, "model_type": "llama"}))
    for checkpointing in (True, False):
        cfg = TrainConfig(base_model=str(tmp_path), batch_size=2, max_seq_length=512, lora_rank=16,
                          gradient_checkpointing=checkpointing, mixed_precision="bf16")
        parts = estimate_breakdown(cfg, "llm").parts
        estimate = parts["activations"] + parts["LoRA weights, gradients and optimizer"]
        measured = bench_memory.measure_llm_step_peak(2, 512, checkpointing, shape=shape).step_peak_bytes / 1e9
        assert 1.0 <= estimate / measured <= 1.4, (checkpointing, estimate, measured)


@pytest.mark.slow
def test_out_of_memory_while_exporting_does_not_retrain(tiny_sd15, demo_images, tmp_path, monkeypatch):
    from lora_studio.training.diffusion import DiffusionTrainer

    def export(self, step, epoch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(DiffusionTrainer, "export", export)
    job = _run(_sd15_config(tiny_sd15, demo_images, tmp_path / "out", batch_size=2, max_train_steps=2, auto_fit=True))
    assert job.status == "failed" and "ran out of memory" in job.error
    assert "auto_fit steps down" not in "\n".join(job.snapshot().log)
