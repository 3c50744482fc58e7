"""Training tab: base model and preset, the settings form, Start/Stop/Save/Resume, and the live view.

The job runs on the engine's background thread (``TrainingJob``), or, with several GPUs, as an
``accelerate launch`` process watched through its run folder (``ProcessJob``); the page polls it with a
``gr.Timer`` (no worker is held while training runs). The job is process-wide, so a reloaded page or a
second browser tab re-attaches to it on load. After an app restart the runs are listed from the outputs
folder and a stopped or interrupted one can be resumed. "Show YAML and command" writes the same config as a
YAML file and shows the command line that trains exactly the same run.

The base model's family (``train_family.family_choices``) decides the preset list and its preselection for
the detected GPU, the target_modules choices (a language model's own layer names) and whether the
language-model settings are unfolded. The estimated peak GPU memory follows the settings as they change.
"""

from __future__ import annotations

import inspect
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from ..config import FAMILIES, TrainConfig
from ..errors import StudioError
from ..presets import detect_gpu, get_preset
from ..training.job import TrainingJob, active_job
from ..training.run_folder import RunFolder, list_runs
from .common import friendly
from .context import StudioContext
from .train_extras import ProcessJob, command_text, memory_text, start_job
from .train_family import family_choices, targets_info
from .train_form import SPECIAL_FIELDS, build_form, config_to_values, form_to_config
from .train_view import (empty_loss_frame, existing_files, log_text, loss_frame, progress_html, run_choices,
                         snapshot_from_run, stats_markdown)

log = logging.getLogger(__name__)

MAX_PLOT_POINTS = 1000


class _Jobs:
    """The last job started from the app in this process (the engine allows one running job at a time)."""

    job: TrainingJob | ProcessJob | None = None

    @classmethod
    def current(cls) -> TrainingJob | ProcessJob | None:
        return active_job() or cls.job

    @classmethod
    def running(cls) -> TrainingJob | ProcessJob | None:
        job = cls.current()
        return job if job is not None and job.is_running() else None


def _thin(losses: list[tuple[int, float]]) -> list[tuple[int, float]]:
    if len(losses) <= MAX_PLOT_POINTS:
        return losses
    k = len(losses) // MAX_PLOT_POINTS + 1
    return losses[::k] + [losses[-1]]


def _gpu_line() -> tuple[str, float | None]:
    gpu = detect_gpu()
    if gpu is None:
        return "No CUDA GPU found: training runs on the CPU (fine for the demo, too slow for real models).", None
    return f"GPU: **{gpu['name']}**, {gpu['memory_gb']:.1f} GB.", gpu["memory_gb"]


def _preset_text(name: str, gpu_gb: float | None) -> str:
    if not name:
        return "No preset: the settings below are used as they are."
    p = get_preset(name)
    sets = ", ".join(f"`{k}: {v}`" for k, v in p.values.items())
    fit = ""
    if gpu_gb is not None:
        fit = " Fits this GPU." if p.vram_gb * 0.93 <= gpu_gb else " **More than this GPU has:** pick a smaller preset."
    return f"**{p.description}**. Made to stay under about **{p.vram_gb:g} GB** of GPU memory.{fit}\n\nSets {sets}."


_targets_info = targets_info  # the target_modules help (tests/test_train_extras.py calls it by this name)


def _image(path: str | None) -> Image.Image | None:
    if not path or not Path(path).is_file():
        return None
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError:
        return None


def _name_parameters(fn, names: list[str]) -> None:
    """Give a ``*values`` handler one named parameter per config key (readable API for gradio_client)."""
    fn.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])


def build_train_tab(ctx: StudioContext) -> dict[str, Any]:
    """Build the Training tab's components and events; returns the components by id (and ``attach``)."""
    demo = ctx.demo
    initial = TrainConfig(output_dir=str(ctx.runs_dir))
    if demo:
        initial = initial.replace(base_model=str(demo.model), train_data_dir=str(demo.images), **demo.train)
    gpu_line, gpu_gb = _gpu_line()
    # The demo keeps its tiny settings: no preset is preselected there (one is only a click away).
    fam = family_choices(initial.base_model, initial.model_family, gpu_gb, preselect=not demo)
    if fam.preset:
        initial = initial.replace(**get_preset(fam.preset).values)
    if fam.llm:
        initial = initial.replace(target_modules=fam.target_value or None)

    intro = f"Pick the base model and your GPU's preset, check the main settings, press **Start**. {gpu_line}"
    if demo and demo.llm_model:
        intro += (f"\n\nDemo language model: pick `{demo.llm_model}` as base model, use `{demo.llm_data}` as "
                  "training data and every layer in target_modules: it teaches answers to start with \"Hear ye!\" "
                  "(then compare answers at the bottom of the Testing tab).")
    gr.Markdown(intro)
    with gr.Row(equal_height=True):
        base = gr.Dropdown(label="Base model (base_model)", choices=ctx.model_choices(), scale=5, elem_id="base-model",
                           value=initial.base_model or None, allow_custom_value=True,
                           info="A diffusers folder, a .safetensors checkpoint, or a hub id such as "
                                "stable-diffusion-v1-5/stable-diffusion-v1-5. Models in the models/ folder are listed.")
        family = gr.Dropdown(label="Family (model_family)", choices=list(FAMILIES), value=initial.model_family,
                             scale=1)
        models_btn = gr.Button("Refresh list", scale=0, min_width=110)
    family_md = gr.Markdown(fam.text, elem_id="model-family")
    data_dir = gr.Textbox(label="Training images (train_data_dir)", value=initial.train_data_dir,
                          info="Filled in from the Dataset tab; images need captions (Captioning tab).")
    from ..training.multi_gpu import available_gpus

    n_gpus = available_gpus()
    with gr.Row():
        with gr.Column(scale=2, min_width=320):
            preset = gr.Dropdown(label="Hardware preset", choices=fam.presets, value=fam.preset, elem_id="preset",
                                 info="The presets of the model's family, preselected from the detected GPU. "
                                      "Picking one changes the settings below.")
            gpus = gr.Number(label="GPUs", value=1, precision=0, minimum=1, maximum=64, visible=n_gpus >= 2,
                             info=f"This machine has {n_gpus} GPUs: more than 1 trains data-parallel through "
                                  "accelerate (effective batch = batch x accumulation x GPUs).")
        with gr.Column(scale=3):
            preset_md = gr.Markdown(_preset_text(fam.preset, gpu_gb))
            memory_md = gr.Markdown(memory_text(initial, fam.family, gpu_gb), elem_id="memory-estimate")
    groups: dict[str, Any] = {}
    form = build_form(initial, open_groups=("llm",) if fam.llm else (), containers=groups,
                      overrides={"target_modules": {"choices": fam.targets, "info": fam.target_info}})
    names = list(SPECIAL_FIELDS) + list(form)
    comps = [base, family, data_dir] + list(form.values())

    with gr.Row():
        start_btn = gr.Button("Start training", variant="primary")
        stop_btn = gr.Button("Stop", variant="stop")
        save_btn = gr.Button("Save checkpoint now")
        cmd_btn = gr.Button("Show YAML and command")
    with gr.Accordion("Equivalent YAML and command line", open=False) as cmd_box:
        cmd_md = gr.Markdown()
        yaml_code = gr.Code(language="yaml", label="config", interactive=False, lines=12)
        yaml_file = gr.File(label="YAML file", interactive=False)

    progress = gr.HTML(progress_html(0, 0, "idle"), elem_id="train-progress")
    stats = gr.Markdown(elem_id="train-stats")
    with gr.Row():
        loss_plot = gr.LinePlot(empty_loss_frame(), x="step", y="loss", title="Training loss", height=300,
                                scale=3, elem_id="loss-plot", x_title="step", y_title="loss")
        sample = gr.Image(label="Latest sample image", type="pil", interactive=False, height=300, scale=2)
    log_box = gr.Textbox(label="Log", lines=8, max_lines=8, autoscroll=True, interactive=False)
    files = gr.File(label="LoRA files of this run", file_count="multiple", interactive=False)
    with gr.Accordion("Runs: look at earlier runs, resume a stopped or interrupted one", open=True):
        with gr.Row(equal_height=True):
            runs = gr.Dropdown(label="Runs in the output folder", choices=run_choices(initial.output_dir), scale=4,
                               allow_custom_value=True)
            runs_btn = gr.Button("Refresh", scale=0, min_width=90)
            show_run_btn = gr.Button("Show", scale=0, min_width=90)
            resume_btn = gr.Button("Resume", scale=0, min_width=100)
    timer = gr.Timer(1.0, active=False)
    seen = gr.State("")  # the sample image already shown (not re-sent every second)

    view_outputs = [progress, stats, loss_plot, sample, log_box, files, seen]

    def view(snap: dict[str, Any], shown: str) -> list[Any]:
        sample_path = snap.get("sample") or ""
        img = _image(sample_path) if sample_path != shown else gr.skip()
        served = [f for f in existing_files(snap.get("files") or []) if Path(f).resolve().is_relative_to(ctx.outputs)]
        return [progress_html(snap.get("step", 0), snap.get("total", 0), snap.get("status", ""), snap.get("stage", "")),
                stats_markdown(snap), loss_frame(_thin(snap.get("losses") or [])), img,
                log_text(snap.get("log") or []), served or None, sample_path]

    def checked_config(values: tuple) -> TrainConfig:
        cfg = form_to_config(names, values)
        data = cfg.train_data_dir
        data_path = (ctx.policy.file(data, "training data file") if data and Path(data.strip()).is_file()
                     else ctx.policy.folder(data, "training data folder"))
        cfg = cfg.replace(base_model=ctx.policy.model_ref(cfg.base_model), train_data_dir=str(data_path))
        # The optional paths too: a model part may be a hub id, the others are files or folders on this disk.
        for name, what in (("vae", "VAE"), ("single_file_config", "single-file config model")):
            if getattr(cfg, name):
                cfg = cfg.replace(**{name: ctx.policy.model_ref(getattr(cfg, name), f"{what} ({name})")})
        for name, what in (("init_lora", "LoRA to continue from (init_lora)"),
                           ("metadata_path", "caption table (metadata_path)")):
            if getattr(cfg, name):
                cfg = cfg.replace(**{name: str(ctx.policy.file(getattr(cfg, name), what))})
        if not ctx.policy.allows(cfg.output_dir):
            raise gr.Error(f"The output folder '{cfg.output_dir}' is outside the folders this shared app may use.")
        return cfg

    @friendly
    def start(*values):
        cfg = checked_config(values[:-1])
        if _Jobs.running() is not None:
            raise gr.Error(f"A training run is already in progress ({_Jobs.running().run_name}); stop it or "
                           "wait for it to finish before starting another.")
        job = start_job(cfg, int(values[-1] or 1))
        _Jobs.job = job
        gr.Info(f"Training started: {job.run_name}")
        return view(job.snapshot(), "") + [gr.Timer(active=True)]

    def running_job() -> TrainingJob | ProcessJob:
        job = _Jobs.running()
        if job is None:
            raise gr.Error("No training is running.")
        return job

    @friendly
    def stop() -> str:
        running_job().stop()
        return "Stopping after this step; a checkpoint is saved so the run can be resumed."

    @friendly
    def save_now() -> str:
        running_job().save_now()
        return "A checkpoint will be saved after this step."

    @friendly
    def resume(run_dir: str, num_gpus: float | None = 1):
        if not run_dir:
            raise gr.Error("Pick a run to resume.")
        folder = ctx.policy.folder(run_dir, "run folder")
        if _Jobs.running() is not None:
            raise gr.Error(f"A training run is already in progress ({_Jobs.running().run_name}); stop it or "
                           "wait for it to finish before resuming another.")
        job = start_job(None, int(num_gpus or 1), resume_dir=folder)
        _Jobs.job = job
        gr.Info(f"Resuming {job.run_name}")
        return view(job.snapshot(), "") + [gr.Timer(active=True)]

    def poll(shown: str, output_dir: str):
        job = _Jobs.current()
        if job is None:
            return [gr.skip()] * len(view_outputs) + [gr.skip(), gr.Timer(active=False)]
        running = job.is_running()
        runs_update = gr.skip() if running else gr.update(choices=run_choices(output_dir or ctx.runs_dir),
                                                          value=str(job.run.path) if job.run else None)
        return view(job.snapshot(), shown) + [runs_update, gr.Timer(active=running)]

    def attach(output_dir: str):
        """On page load: show the running job (and poll it), else the last job or the newest run."""
        choices = run_choices(output_dir or ctx.runs_dir)
        job = _Jobs.current()
        if job is not None:
            value = str(job.run.path) if job.run else None
            return view(job.snapshot(), "") + [gr.update(choices=choices, value=value),
                                               gr.Timer(active=job.is_running())]
        newest = list_runs(output_dir or ctx.runs_dir)
        if newest:
            snap = snapshot_from_run(newest[0])
            return view(snap, "") + [gr.update(choices=choices, value=str(newest[0].path)), gr.Timer(active=False)]
        return [gr.skip()] * len(view_outputs) + [gr.update(choices=choices), gr.Timer(active=False)]

    @friendly
    def show_run(run_dir: str):
        if not run_dir:
            raise gr.Error("Pick a run.")
        job = _Jobs.current()
        if job is not None and job.run and str(job.run.path) == str(run_dir):
            return view(job.snapshot(), "")
        return view(snapshot_from_run(RunFolder.open(ctx.policy.folder(run_dir, "run folder"))), "")

    @friendly
    def show_command(*values):
        cfg = checked_config(values[:-1])
        path = ctx.configs_dir / f"{cfg.output_name}.yaml"
        cfg.save(path)
        python = "python" if sys.platform == "win32" else "python3"
        quoted = f'"{path}"' if sys.platform == "win32" else shlex.quote(str(path))
        cmd = f"{python} -m lora_studio train --config {quoted}"
        resume_cmd = f"{python} -m lora_studio train --resume <run folder>"
        num_gpus = int(values[-1] or 1)
        if num_gpus > 1:
            cmd = command_text(path, num_gpus, python)
            resume_cmd = command_text(path, num_gpus, python, resume_dir="RUN_FOLDER").replace("RUN_FOLDER",
                                                                                             "<run folder>")
        text = (f"Saved as `{path}`. The same run from a terminal (in the LoRA Studio folder, with its "
                f"virtual environment active):\n\n```\n{cmd}\n```\n\nTo continue a stopped run: "
                f"`{resume_cmd}`")
        return text, cfg.to_yaml(), str(path), gr.Accordion(open=True)

    @friendly
    def apply_preset(name: str):
        text = _preset_text(name, gpu_gb)
        if not name:
            return [text] + [gr.skip()] * len(form)
        values = get_preset(name).values
        return [text] + [gr.update(value=v) if n in values else gr.skip()
                         for n, v in zip(form, config_to_values(TrainConfig(**{k: v for k, v in values.items()}),
                                                               list(form)))]

    def on_model_change(base_model: str, model_family: str, targets: list[str] | None):
        """A new base model or family: its presets (the recommended one picked), layer choices, LLM fields."""
        c = family_choices(base_model, model_family, gpu_gb, targets, preselect=not demo)
        return (c.text, gr.update(choices=c.presets, value=c.preset),
                gr.update(choices=c.targets, value=c.target_value, info=c.target_info), gr.Accordion(open=c.llm))

    def status_json() -> dict[str, Any]:
        job = _Jobs.current()
        if job is not None:
            snap = job.snapshot()
            snap["running"] = job.is_running()
            return snap
        return {"status": "idle", "running": False}

    def update_estimate(*values):
        try:
            cfg = form_to_config(names, values)
        except StudioError as exc:
            return f"**Estimated peak GPU memory:** not available until the settings are valid ({exc})."
        return memory_text(cfg, None, gpu_gb)

    _name_parameters(start, names + ["num_gpus"])
    _name_parameters(show_command, names + ["num_gpus"])
    _name_parameters(update_estimate, names)
    run_outputs = view_outputs + [timer]
    start_btn.click(start, comps + [gpus], run_outputs, api_name="start_training")
    stop_btn.click(stop, None, [stats], api_name="stop_training")
    save_btn.click(save_now, None, [stats], api_name="save_checkpoint_now")
    resume_btn.click(resume, [runs, gpus], run_outputs, api_name="resume_training")
    show_run_btn.click(show_run, [runs], view_outputs, api_name="show_run")
    runs_btn.click(lambda d: gr.update(choices=run_choices(d or ctx.runs_dir)), [form["output_dir"]], [runs],
                   api_visibility="private")
    timer.tick(poll, [seen, form["output_dir"]], view_outputs + [runs, timer], api_visibility="private",
               show_progress="hidden", concurrency_limit=None)
    cmd_btn.click(show_command, comps + [gpus], [cmd_md, yaml_code, yaml_file, cmd_box], api_name="show_command")
    # A preset changes some of these fields, so the estimate follows a preset too.
    estimate_inputs = [base, family] + [form[k] for k in (
        "batch_size", "resolution", "gradient_checkpointing", "mixed_precision", "optimizer", "train_text_encoder",
        "lora_rank", "target_modules", "max_seq_length", "load_in_4bit") if k in form]
    gr.on([c.change for c in estimate_inputs], update_estimate, comps, [memory_md], api_name="memory_estimate",
          show_progress="hidden", trigger_mode="always_last")
    preset.change(apply_preset, [preset], [preset_md] + list(form.values()), api_visibility="private")
    gr.on([base.change, family.change], on_model_change, [base, family, form["target_modules"]],
          [family_md, preset, form["target_modules"], groups["llm"]], api_visibility="private")
    models_btn.click(lambda: gr.update(choices=ctx.model_choices()), None, [base], api_visibility="private")
    gr.api(status_json, api_name="training_status")

    def attach_to(blocks: gr.Blocks) -> None:
        blocks.load(attach, [form["output_dir"]], view_outputs + [runs, timer], api_visibility="private")

    return {"base_model": base, "train_data_dir": data_dir, "form": form, "start": start_btn, "stop": stop_btn,
            "loss_plot": loss_plot, "progress": progress, "log": log_box, "runs": runs, "timer": timer,
            "attach": attach_to}
