"""Training tab: base model and preset, the settings form, Start/Stop/Save/Resume, and the live view.

A run is started through the engine's ``training.jobs.start_job``: on the engine's background thread in this
process, or with several GPUs as an ``accelerate launch`` process watched through its run folder. The page
polls the job with a ``gr.Timer`` (no worker is held while training runs). The job is process-wide, so a
reloaded page or a second browser tab re-attaches to it on load. After an app restart the runs are listed
from the outputs folder and a stopped or interrupted one can be resumed. "Show YAML and command" writes the
same config as a YAML file and shows the command line that trains exactly the same run.

The base model's family (``train_family.family_choices``) decides the preset list and its preselection for
the detected GPU, the target_modules choices (a language model's own layer names) and whether the
language-model settings are unfolded. The estimated peak GPU memory follows the settings as they change.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr
from PIL import Image

from ..config import FAMILIES, TrainConfig
from ..errors import StudioError
from ..families import FAMILIES as REGISTRY
from ..hardware import detect_gpu
from ..presets import get_preset
from ..training import jobs
from ..training.jobs import Snapshot, snapshot_from_run
from ..training.multi_gpu import available_gpus
from ..training.run_folder import RunFolder, list_runs
from .common import friendly
from .context import StudioContext
from .demo import DEFAULT_FAMILY, demo_form_values
from .train_extras import command_text, memory_text
from .train_family import family_choices
from .train_form import SPECIAL_FIELDS, build_form, config_to_values, form_to_config
from .train_view import (empty_loss_frame, existing_files, log_text, loss_frame, progress_html, run_choices,
                         stats_markdown)

log = logging.getLogger(__name__)

MAX_PLOT_POINTS = 1000
ESTIMATE_FIELDS = ("batch_size", "resolution", "gradient_checkpointing", "mixed_precision", "optimizer",
                   "train_text_encoder", "lora_rank", "target_modules", "max_seq_length", "load_in_4bit",
                   "base_quantization", "max_sequence_length", "lora_targets", "train_double_block_indices",
                   "train_single_block_indices", "blocks_to_swap")
# Settings groups that a family unfolds (llm, flow ...): a new base model unfolds its own and folds the others.
FAMILY_GROUPS = tuple(sorted({f.settings_group for f in REGISTRY.values() if f.settings_group}))


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


def _initial_settings(ctx: StudioContext) -> SimpleNamespace:
    """The config the form starts with, the detected GPU and the base model's family choices."""
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
    return SimpleNamespace(initial=initial, gpu_line=gpu_line, gpu_gb=gpu_gb, fam=fam, demo=demo)


def _settings_layout(ctx: StudioContext, s: SimpleNamespace) -> SimpleNamespace:
    """Model row, preset and memory estimate, and the generated settings form."""
    c = SimpleNamespace()
    intro = f"Pick the base model and your GPU's preset, check the main settings, press **Start**. {s.gpu_line}"
    if s.demo and s.demo.llm_model:
        intro += (f"\n\nDemo language model: pick `{s.demo.llm_model}` as base model, use `{s.demo.llm_data}` as "
                  "training data and every layer in target_modules: it teaches answers to start with \"Hear ye!\" "
                  "(then compare answers at the bottom of the Testing tab).")
    if s.demo:
        intro += ("\n\nDemo image models: picking one (SD1.5, FLUX.1, Z-Image ...) sets the demo's training settings "
                  "for its family, which teach the pink background in well under a minute on a CPU.")
    gr.Markdown(intro)
    with gr.Row(equal_height=True):
        c.base = gr.Dropdown(label="Base model (base_model)", choices=ctx.model_choices(), scale=5,
                             elem_id="base-model", value=s.initial.base_model or None, allow_custom_value=True,
                             info="A diffusers folder, a .safetensors checkpoint, or a hub id such as "
                                  "stable-diffusion-v1-5/stable-diffusion-v1-5. Models in the models/ folder are "
                                  "listed.")
        c.family = gr.Dropdown(label="Family (model_family)", choices=list(FAMILIES), value=s.initial.model_family,
                               scale=1)
        c.models_btn = gr.Button("Refresh list", scale=0, min_width=110)
    c.family_md = gr.Markdown(s.fam.text, elem_id="model-family")
    c.data_dir = gr.Textbox(label="Training images (train_data_dir)", value=s.initial.train_data_dir,
                            info="Filled in from the Dataset tab; images need captions (Captioning tab).")
    n_gpus = available_gpus()
    with gr.Row():
        with gr.Column(scale=2, min_width=320):
            c.preset = gr.Dropdown(label="Hardware preset", choices=s.fam.presets, value=s.fam.preset,
                                   elem_id="preset", info="The presets of the model's family, preselected from the "
                                                          "detected GPU. Picking one changes the settings below.")
            c.gpus = gr.Number(label="GPUs", value=1, precision=0, minimum=1, maximum=64, visible=n_gpus >= 2,
                               info=f"This machine has {n_gpus} GPUs: more than 1 trains data-parallel through "
                                    "accelerate (effective batch = batch x accumulation x GPUs).")
        with gr.Column(scale=3):
            c.preset_md = gr.Markdown(_preset_text(s.fam.preset, s.gpu_gb))
            c.memory_md = gr.Markdown(memory_text(s.initial, s.fam.family, s.gpu_gb), elem_id="memory-estimate")
    c.groups = {}
    c.form = build_form(s.initial, open_groups=(s.fam.group,) if s.fam.group else (), containers=c.groups,
                        overrides={"target_modules": {"choices": s.fam.targets, "info": s.fam.target_info}})
    c.names = list(SPECIAL_FIELDS) + list(c.form)
    c.comps = [c.base, c.family, c.data_dir] + list(c.form.values())
    return c


def _run_layout(c: SimpleNamespace, initial: TrainConfig) -> None:
    """Buttons, the command box, the live view of a run and the list of runs."""
    with gr.Row():
        c.start_btn = gr.Button("Start training", variant="primary")
        c.stop_btn = gr.Button("Stop", variant="stop")
        c.save_btn = gr.Button("Save checkpoint now")
        c.cmd_btn = gr.Button("Show YAML and command")
    with gr.Accordion("Equivalent YAML and command line", open=False) as c.cmd_box:
        c.cmd_md = gr.Markdown()
        c.yaml_code = gr.Code(language="yaml", label="config", interactive=False, lines=12)
        c.yaml_file = gr.File(label="YAML file", interactive=False)
    c.progress = gr.HTML(progress_html(0, 0, "idle"), elem_id="train-progress")
    c.stats = gr.Markdown(elem_id="train-stats")
    with gr.Row():
        c.loss_plot = gr.LinePlot(empty_loss_frame(), x="step", y="loss", color="series", height=300,
                                  title="Loss (training; validation when set)", scale=3, elem_id="loss-plot",
                                  x_title="step", y_title="loss", color_map={"training": "#3b7dd8",
                                                                              "validation": "#e0702c"})
        c.sample = gr.Image(label="Latest sample image", type="pil", interactive=False, height=300, scale=2)
    c.log_box = gr.Textbox(label="Log", lines=8, max_lines=8, autoscroll=True, interactive=False)
    c.files = gr.File(label="LoRA files of this run", file_count="multiple", interactive=False)
    with gr.Accordion("Runs: look at earlier runs, resume a stopped or interrupted one", open=True):
        with gr.Row(equal_height=True):
            c.runs = gr.Dropdown(label="Runs in the output folder", choices=run_choices(initial.output_dir),
                                 scale=4, allow_custom_value=True)
            c.runs_btn = gr.Button("Refresh", scale=0, min_width=90)
            c.show_run_btn = gr.Button("Show", scale=0, min_width=90)
            c.resume_btn = gr.Button("Resume", scale=0, min_width=100)
    c.timer = gr.Timer(1.0, active=False)
    c.seen = gr.State("")  # the sample image already shown (not re-sent every second)
    c.view_outputs = [c.progress, c.stats, c.loss_plot, c.sample, c.log_box, c.files, c.seen]


class _Handlers:
    """What the tab's buttons, timer and page load do (engine calls; gradio only for updates and errors)."""

    def __init__(self, ctx: StudioContext, s: SimpleNamespace, c: SimpleNamespace):
        self.ctx, self.s, self.c = ctx, s, c
        # The demo's settings that follow its base model (target_modules follows every model already).
        self.demo_fields = [n for n in demo_form_values(DEFAULT_FAMILY) if n in c.form and n != "target_modules"
                            ] if s.demo else []

    # --- the view of a run ---------------------------------------------------------------------------
    def view(self, snap: Snapshot, shown: str) -> list[Any]:
        sample_path = snap.sample or ""
        img = _image(sample_path) if sample_path != shown else gr.skip()
        served = [f for f in existing_files(snap.files) if Path(f).resolve().is_relative_to(self.ctx.outputs)]
        return [progress_html(snap.step, snap.total, snap.status, snap.stage), stats_markdown(snap),
                loss_frame(_thin(snap.losses), snap.val_losses), img, log_text(snap.log), served or None, sample_path]

    def checked_config(self, values: tuple) -> TrainConfig:
        """The form as a config, every path checked by its field's kind against the app's path policy."""
        return self.ctx.policy.check_config(form_to_config(self.c.names, values))

    # --- buttons ---------------------------------------------------------------------------------------
    def start(self, values: tuple, num_gpus: float | None) -> list[Any]:
        job = jobs.start_job(self.checked_config(values), int(num_gpus or 1))
        gr.Info(f"Training started: {job.run.name}")
        return self.view(job.snapshot(), "") + [gr.Timer(active=True)]

    def resume(self, run_dir: str, num_gpus: float | None = 1) -> list[Any]:
        if not run_dir:
            raise gr.Error("Pick a run to resume.")
        folder = self.ctx.policy.folder(run_dir, "run folder")
        job = jobs.start_job(None, int(num_gpus or 1), resume_dir=folder)
        gr.Info(f"Resuming {job.run.name}")
        return self.view(job.snapshot(), "") + [gr.Timer(active=True)]

    @staticmethod
    def running() -> jobs.Job:
        job = jobs.running_job()
        if job is None:
            raise gr.Error("No training is running.")
        return job

    def stop(self) -> str:
        self.running().stop()
        return "Stopping after this step; a checkpoint is saved so the run can be resumed."

    def save_now(self) -> str:
        self.running().save_now()
        return "A checkpoint will be saved after this step."

    def show_run(self, run_dir: str) -> list[Any]:
        if not run_dir:
            raise gr.Error("Pick a run.")
        job = jobs.current_job()
        if job is not None and job.run and str(job.run.path) == str(run_dir):
            return self.view(job.snapshot(), "")
        return self.view(snapshot_from_run(RunFolder.open(self.ctx.policy.folder(run_dir, "run folder"))), "")

    def show_command(self, values: tuple, num_gpus: float | None) -> tuple:
        cfg = self.checked_config(values)
        path = self.ctx.configs_dir / f"{cfg.output_name}.yaml"
        cfg.save(path)
        python = "python" if sys.platform == "win32" else "python3"
        quoted = f'"{path}"' if sys.platform == "win32" else shlex.quote(str(path))
        cmd = f"{python} -m lora_studio train --config {quoted}"
        resume_cmd = f"{python} -m lora_studio train --resume <run folder>"
        gpus = int(num_gpus or 1)
        if gpus > 1:
            cmd = command_text(path, gpus, python)
            resume_cmd = command_text(path, gpus, python, resume_dir="RUN_FOLDER").replace("RUN_FOLDER",
                                                                                          "<run folder>")
        text = (f"Saved as `{path}`. The same run from a terminal (in the LoRA Studio folder, with its "
                f"virtual environment active):\n\n```\n{cmd}\n```\n\nTo continue a stopped run: `{resume_cmd}`")
        return text, cfg.to_yaml(), str(path), gr.Accordion(open=True)

    # --- polling and page load -------------------------------------------------------------------------
    def poll(self, shown: str, output_dir: str) -> list[Any]:
        job = jobs.current_job()
        if job is None:
            return [gr.skip()] * len(self.c.view_outputs) + [gr.skip(), gr.Timer(active=False)]
        running = job.is_running()
        runs_update = gr.skip() if running else gr.update(choices=run_choices(output_dir or self.ctx.runs_dir),
                                                          value=str(job.run.path) if job.run else None)
        return self.view(job.snapshot(), shown) + [runs_update, gr.Timer(active=running)]

    def attach(self, output_dir: str) -> list[Any]:
        """On page load: show the running job (and poll it), else the last job or the newest run."""
        choices = run_choices(output_dir or self.ctx.runs_dir)
        job = jobs.current_job()
        if job is not None:
            value = str(job.run.path) if job.run else None
            return self.view(job.snapshot(), "") + [gr.update(choices=choices, value=value),
                                                    gr.Timer(active=job.is_running())]
        newest = list_runs(output_dir or self.ctx.runs_dir)
        if newest:
            return self.view(snapshot_from_run(newest[0]), "") + [
                gr.update(choices=choices, value=str(newest[0].path)), gr.Timer(active=False)]
        return [gr.skip()] * len(self.c.view_outputs) + [gr.update(choices=choices), gr.Timer(active=False)]

    def status_json(self) -> dict[str, Any]:
        job = jobs.current_job()
        if job is None:
            return {"status": "idle", "running": False}
        return {**dataclasses.asdict(job.snapshot()), "running": job.is_running()}

    # --- settings that follow other settings ------------------------------------------------------------
    def apply_preset(self, name: str) -> list[Any]:
        text = _preset_text(name, self.s.gpu_gb)
        if not name:
            return [text] + [gr.skip()] * len(self.c.form)
        values = get_preset(name).values
        shown = config_to_values(TrainConfig(**dict(values)), list(self.c.form))
        return [text] + [gr.update(value=v) if n in values else gr.skip() for n, v in zip(self.c.form, shown)]

    def on_model_change(self, base_model: str, model_family: str, targets: list[str] | None) -> tuple:
        """A new base model or family: its presets (the recommended one picked), layer choices, and its own
        settings group unfolded (the others folded); one of the demo's image models also brings its family's
        demo settings (``demo_fields``)."""
        f = family_choices(base_model, model_family, self.s.gpu_gb, targets, preselect=not self.s.demo)
        return (f.text, gr.update(choices=f.presets, value=f.preset),
                gr.update(choices=f.targets, value=f.target_value, info=f.target_info),
                *(gr.Accordion(open=f.group == g) for g in FAMILY_GROUPS), *self.demo_values(base_model))

    def demo_values(self, base_model: str) -> list[Any]:
        """The form values of ``demo_fields`` for one of the demo's image models; skips for any other model."""
        family = self.s.demo.family_of(base_model) if self.s.demo else None
        if family is None:
            return [gr.skip()] * len(self.demo_fields)
        return config_to_values(TrainConfig().replace(**demo_form_values(family)), self.demo_fields)

    def update_estimate(self, values: tuple) -> str:
        try:
            cfg = form_to_config(self.c.names, values)
        except StudioError as exc:
            return f"**Estimated peak GPU memory:** not available until the settings are valid ({exc})."
        return memory_text(cfg, None, self.s.gpu_gb)


def _wire(ctx: StudioContext, c: SimpleNamespace, h: _Handlers) -> None:
    """Connect the components to the handlers; the API names are what gradio_client (and the tests) call."""
    @friendly
    def start(*values):
        return h.start(values[:-1], values[-1])

    @friendly
    def show_command(*values):
        return h.show_command(values[:-1], values[-1])

    def update_estimate(*values):
        return h.update_estimate(values)

    _name_parameters(start, c.names + ["num_gpus"])
    _name_parameters(show_command, c.names + ["num_gpus"])
    _name_parameters(update_estimate, c.names)
    run_outputs = c.view_outputs + [c.timer]
    c.start_btn.click(start, c.comps + [c.gpus], run_outputs, api_name="start_training")
    c.stop_btn.click(friendly(h.stop), None, [c.stats], api_name="stop_training")
    c.save_btn.click(friendly(h.save_now), None, [c.stats], api_name="save_checkpoint_now")
    c.resume_btn.click(friendly(h.resume), [c.runs, c.gpus], run_outputs, api_name="resume_training")
    c.show_run_btn.click(friendly(h.show_run), [c.runs], c.view_outputs, api_name="show_run")
    c.runs_btn.click(lambda d: gr.update(choices=run_choices(d or ctx.runs_dir)), [c.form["output_dir"]], [c.runs],
                     api_visibility="private")
    c.timer.tick(h.poll, [c.seen, c.form["output_dir"]], c.view_outputs + [c.runs, c.timer],
                 api_visibility="private", show_progress="hidden", concurrency_limit=None)
    c.cmd_btn.click(show_command, c.comps + [c.gpus], [c.cmd_md, c.yaml_code, c.yaml_file, c.cmd_box],
                    api_name="show_command")
    # A preset changes some of these fields, so the estimate follows a preset too.
    estimate_inputs = [c.base, c.family] + [c.form[k] for k in ESTIMATE_FIELDS if k in c.form]
    gr.on([x.change for x in estimate_inputs], update_estimate, c.comps, [c.memory_md], api_name="memory_estimate",
          show_progress="hidden", trigger_mode="always_last")
    c.preset.change(friendly(h.apply_preset), [c.preset], [c.preset_md] + list(c.form.values()),
                    api_visibility="private")
    gr.on([c.base.change, c.family.change], h.on_model_change, [c.base, c.family, c.form["target_modules"]],
          [c.family_md, c.preset, c.form["target_modules"]] + [c.groups[g] for g in FAMILY_GROUPS]
          + [c.form[n] for n in h.demo_fields], api_visibility="private")
    c.models_btn.click(lambda: gr.update(choices=ctx.model_choices()), None, [c.base], api_visibility="private")
    gr.api(h.status_json, api_name="training_status")


def build_train_tab(ctx: StudioContext) -> dict[str, Any]:
    """Build the Training tab's components and events; returns the components by id (and ``attach``)."""
    s = _initial_settings(ctx)
    c = _settings_layout(ctx, s)
    _run_layout(c, s.initial)
    h = _Handlers(ctx, s, c)
    _wire(ctx, c, h)

    def attach_to(blocks: gr.Blocks) -> None:
        blocks.load(h.attach, [c.form["output_dir"]], c.view_outputs + [c.runs, c.timer], api_visibility="private")

    return {"base_model": c.base, "model_family": c.family, "train_data_dir": c.data_dir, "form": c.form,
            "start": c.start_btn, "stop": c.stop_btn, "loss_plot": c.loss_plot, "progress": c.progress,
            "log": c.log_box, "runs": c.runs, "timer": c.timer, "attach": attach_to}
