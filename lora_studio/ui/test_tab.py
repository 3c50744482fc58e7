"""Testing tab: the same prompt and seed at several LoRA strengths, side by side, and across checkpoints.

Pick a LoRA from the runs (or type any file), write a prompt, press "Render strengths": one labelled
picture per strength (0 = the base model) saved as one PNG, plus the ``<lora:name:strength>`` text for
AUTOMATIC1111/Forge. "Checkpoint x strength grid" adds one row per saved checkpoint of the same run.
For language-model LoRAs, the same prompt is answered side by side at each strength (when the LLM
engine is installed). The rendering itself is ``inference.grid`` (the ``generate`` command uses it too).
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr

from ..errors import StudioError
from ..inference.grid import RenderSettings, lora_display_name, model_render_defaults, parse_strengths, render_grid
from ..training.run_folder import RunFolder, list_runs
from .common import friendly, progress_callback
from .context import StudioContext

DEFAULT_STRENGTHS_TEXT = "0, 0.25, 0.5, 0.75, 1"


def run_of(lora_file: str | Path) -> RunFolder | None:
    """The run folder a LoRA file belongs to (the file itself or a checkpoint's file), if any."""
    p = Path(lora_file)
    for parent in list(p.parents)[:4]:
        if (parent / "config.yaml").is_file() and (parent / "job.json").is_file():
            return RunFolder(parent)
    return None


RECOMMENDED = " (recommended)"


def recommended_step(run: RunFolder) -> tuple[int | None, bool]:
    """(step, is the final file) of the run's recommended LoRA: the lowest validation loss (``job.json``)."""
    rec = run.read_state().get("recommended") or {}
    return rec.get("step"), bool(rec.get("final"))


def _final_files(run: RunFolder) -> list[Path]:
    """The run's exported LoRA files (``-raw`` EMA-free copies after the main one)."""
    return sorted(run.path.glob("*.safetensors"), key=lambda f: (f.stem.endswith("-raw"), f.name))


def lora_choices(runs_dir: Path) -> list[tuple[str, str]]:
    """(label, file) for the image LoRA files of every run: the final file, then checkpoints newest first; the one
    with the lowest validation loss says "(recommended)"."""
    out = []
    for run in list_runs(runs_dir):
        best, final = recommended_step(run)
        for i, f in enumerate(_final_files(run)):
            mark = RECOMMENDED if final and i == 0 else ""
            out.append((f"{run.name} / {f.name} (final){mark}", str(f)))
        for step, d in reversed(run.list_checkpoints()):
            for f in sorted(d.glob("*.safetensors")):
                mark = RECOMMENDED if step == best and not final else ""
                out.append((f"{run.name} / step {step}{mark}", str(f)))
    return out


def checkpoint_rows(lora_file: Path) -> list[tuple[str, Path]]:
    """(label, file) rows for a checkpoint grid: each checkpoint of the file's run, then the final file; the row
    with the lowest validation loss is labelled "(recommended)"."""
    run = run_of(lora_file)
    if run is None:
        return [(lora_display_name(lora_file), lora_file)]
    best, final = recommended_step(run)
    rows = [(f"step {step}" + (RECOMMENDED if step == best and not final else ""), f)
            for step, d in run.list_checkpoints() for f in sorted(d.glob("*.safetensors"))[:1]]
    rows += [("final" + (RECOMMENDED if final else ""), f) for f in _final_files(run)[:1]]
    return rows or [(lora_display_name(lora_file), lora_file)]


def _run_config(lora_file: str):
    """The TrainConfig of the run a LoRA file belongs to, or None."""
    run = run_of(lora_file) if lora_file else None
    if run is None:
        return None
    try:
        return run.load_config()
    except Exception:
        return None


def _base_for(lora_file: str) -> str:
    cfg = _run_config(lora_file)
    return cfg.base_model if cfg is not None else ""


def model_options(lora_file: str, base_model: str) -> dict[str, Any]:
    """How the run loaded its base model (``vae``, ``single_file_config``), when ``base_model`` is that one."""
    cfg = _run_config(lora_file)
    if cfg is None or (base_model and base_model != cfg.base_model):
        return {}
    return {"vae": cfg.vae, "single_file_config": cfg.single_file_config}


def _grid_layout(ctx: StudioContext) -> SimpleNamespace:
    """The image part of the tab: LoRA and base model, prompt and settings, buttons, the result."""
    c = SimpleNamespace()
    render_defaults = ctx.demo.render if ctx.demo else {}
    gr.Markdown("Compare your LoRA at several strengths with the same prompt and seed (strength 0 is the base "
                "model without the LoRA). Copy the `<lora:...>` text into AUTOMATIC1111 or Forge. When the run "
                "measured a validation loss, the checkpoint with the lowest one is marked *(recommended)*.")
    choices = lora_choices(ctx.runs_dir)
    with gr.Row(equal_height=True):
        c.lora = gr.Dropdown(label="LoRA file", choices=choices, value=choices[0][1] if choices else None,
                             allow_custom_value=True, scale=5,
                             info="From your runs, or type the path of any .safetensors LoRA.")
        c.refresh_btn = gr.Button("Refresh list", scale=0, min_width=110)
    c.base = gr.Textbox(label="Base model", value=_base_for(choices[0][1]) if choices else "",
                        info="Filled in from the run's config; any model of the same family works.")
    c.prompt = gr.Textbox(label="Prompt", lines=2, value=render_defaults.get("prompt", ""),
                          placeholder="mystyle, a portrait of a woman in a garden")
    c.negative = gr.Textbox(label="Negative prompt", value="")
    with gr.Row():
        c.seed = gr.Number(label="Seed", value=42, precision=0, minimum=0)
        c.steps = gr.Number(label="Steps", value=render_defaults.get("steps", 25), precision=0, minimum=1,
                            maximum=150)
        c.cfg = gr.Number(label="CFG (guidance)", value=render_defaults.get("cfg", 7.0), minimum=0, maximum=30,
                          step=0.5)
        c.size = gr.Number(label="Size (px, 0 = model default)", value=render_defaults.get("size", 0), precision=0,
                           minimum=0, maximum=2048, step=64)
    c.strengths = gr.Textbox(label="Strengths", value=DEFAULT_STRENGTHS_TEXT, info="Comma separated; 0 = base model.")
    with gr.Row():
        c.render_btn = gr.Button("Render strengths", variant="primary")
        c.grid_btn = gr.Button("Checkpoint x strength grid")
    c.grid_image = gr.Image(label="Result (one PNG)", type="filepath", interactive=False, height=420,
                            elem_id="grid-image")
    with gr.Row():
        c.tags = gr.Textbox(label="Paste into AUTOMATIC1111 / Forge", buttons=["copy"], scale=3,
                            elem_id="a1111-tags")
        c.grid_file = gr.File(label="Grid PNG", interactive=False, scale=2, height=90)
    return c


def build_test_tab(ctx: StudioContext) -> dict[str, Any]:
    """Build the Testing tab's components and events; returns the components by id (and ``refresh``)."""
    c = _grid_layout(ctx)
    lora, base, grid_image, tags, grid_file = c.lora, c.base, c.grid_image, c.tags, c.grid_file

    def settings(prompt_v, negative_v, seed_v, steps_v, cfg_v, size_v) -> RenderSettings:
        px = int(size_v or 0) or None
        return RenderSettings(prompt=prompt_v or "", negative=negative_v or "", seed=int(seed_v or 0),
                              steps=int(steps_v or 20), cfg=float(cfg_v if cfg_v is not None else 7.0),
                              width=px, height=px)

    def render(rows_of, lora_v, base_v, prompt_v, negative_v, seed_v, steps_v, cfg_v, size_v, strengths_v,
               progress):
        lora_path = ctx.policy.file(lora_v, "LoRA file", suffixes=(".safetensors",))
        base_model = ctx.policy.model_ref(base_v or _base_for(str(lora_path)))
        rows = rows_of(lora_path)
        out = ctx.grids_dir / f"{lora_display_name(lora_path)}-{time.strftime('%Y%m%d-%H%M%S')}.png"
        progress(0, desc="Loading the base model and the LoRA")
        result = render_grid(base_model, rows, settings(prompt_v, negative_v, seed_v, steps_v, cfg_v, size_v),
                             parse_strengths(strengths_v), progress=progress_callback(progress, "Rendering"),
                             out_path=out, **model_options(str(lora_path), (base_v or "").strip()))
        return str(result.path), "  ".join(result.tags), str(result.path)

    @friendly
    def render_strengths(lora_v, base_v, prompt_v, negative_v, seed_v, steps_v, cfg_v, size_v, strengths_v,
                         progress=gr.Progress()):
        return render(lambda p: [(lora_display_name(p), p)], lora_v, base_v, prompt_v, negative_v, seed_v, steps_v,
                      cfg_v, size_v, strengths_v, progress)

    @friendly
    def render_checkpoints(lora_v, base_v, prompt_v, negative_v, seed_v, steps_v, cfg_v, size_v, strengths_v,
                           progress=gr.Progress()):
        return render(checkpoint_rows, lora_v, base_v, prompt_v, negative_v, seed_v, steps_v, cfg_v, size_v,
                      strengths_v, progress)

    def refresh(current: str | None, base_v: str):
        new = lora_choices(ctx.runs_dir)
        value = current if current else (new[0][1] if new else None)
        return gr.update(choices=new, value=value), (base_v or _base_for(value or ""))

    inputs = [lora, base, c.prompt, c.negative, c.seed, c.steps, c.cfg, c.size, c.strengths]
    outputs = [grid_image, tags, grid_file]
    c.render_btn.click(render_strengths, inputs, outputs, api_name="render_strengths", concurrency_id="gpu",
                     concurrency_limit=1)
    c.grid_btn.click(render_checkpoints, inputs, outputs, api_name="render_checkpoint_grid", concurrency_id="gpu",
                   concurrency_limit=1)
    c.refresh_btn.click(refresh, [lora, base], [lora, base], api_visibility="private")
    lora.input(lambda f: _base_for(f) or gr.skip(), [lora], [base], api_visibility="private")
    base.change(lambda b: _steps_and_cfg_for(ctx, b), [base], [c.steps, c.cfg], api_visibility="private")
    comps: dict[str, Any] = {"lora": lora, "base": base, "prompt": c.prompt, "render": c.render_btn,
                             "grid": c.grid_btn, "image": grid_image, "tags": tags, "refresh": refresh}
    from ..inference import llm_compare

    comps.update(_build_llm_section(ctx, llm_compare))
    return comps


def _steps_and_cfg_for(ctx: StudioContext, base_model: str):
    """The model's own steps and guidance when its family's registry entry sets them per model (FLUX.1-dev
    28 / 3.5, schnell 4 / 0, Chroma 35 / 5), or the demo's for one of its models (CFG 2 for the Z-Image, SD3
    and FLUX.2 miniatures); other models, and paths the app may not read, keep the fields."""
    family = ctx.demo.family_of(base_model) if ctx.demo else None
    if family:
        from .demo import demo_render_settings

        found = demo_render_settings(family)
        return found["steps"], found["cfg"]
    try:
        ref = ctx.policy.model_ref(base_model)
    except StudioError:
        return gr.skip(), gr.skip()
    defaults = model_render_defaults(ref)
    if not defaults:
        return gr.skip(), gr.skip()
    return defaults["steps"], defaults["cfg"]


def _llm_runs(ctx: StudioContext, engine) -> list[tuple[str, str]]:
    out = []
    for run in list_runs(ctx.runs_dir):
        try:
            adapters = engine.list_adapters(run.path)
        except Exception:
            continue
        for label, folder in adapters:
            out.append((f"{run.name} / {label}", str(folder)))
    return out


def _build_llm_section(ctx: StudioContext, engine) -> dict[str, Any]:
    """Language-model LoRAs: one prompt answered at each strength, side by side."""
    with gr.Accordion("Language-model LoRA: answers side by side", open=False):
        choices = _llm_runs(ctx, engine)
        with gr.Row(equal_height=True):
            adapter = gr.Dropdown(label="Adapter folder", choices=choices, value=choices[0][1] if choices else None,
                                  allow_custom_value=True, scale=5)
            llm_refresh = gr.Button("Refresh list", scale=0, min_width=110)
        llm_base = gr.Textbox(label="Base model", value=_base_for(choices[0][1]) if choices else "")
        llm_prompt = gr.Textbox(label="Prompt", lines=3, value=ctx.demo.llm_prompt if ctx.demo else "")
        with gr.Row():
            llm_strengths = gr.Textbox(label="Strengths", value="0, 0.5, 1")
            max_tokens = gr.Number(label="Max new tokens", value=128, precision=0, minimum=1, maximum=4096)
            temperature = gr.Number(label="Temperature (0 = greedy)", value=0.0, minimum=0, maximum=2, step=0.1)
            llm_seed = gr.Number(label="Seed", value=0, precision=0, minimum=0)
        answer_btn = gr.Button("Answer at each strength", variant="primary")
        answers = gr.Dataframe(headers=["strength", "answer", "new tokens", "seconds"], interactive=False, wrap=True,
                               column_widths=["10%", "70%", "10%", "10%"])

    @friendly
    def answer(adapter_v, base_v, prompt_v, strengths_v, tokens_v, temp_v, seed_v, progress=gr.Progress()):
        folder = ctx.policy.file(adapter_v, "adapter folder")
        base_model = ctx.policy.model_ref(base_v or _base_for(str(folder)))
        if not (prompt_v or "").strip():
            raise gr.Error("Write a prompt first.")
        progress(0, desc="Loading the language model")
        result = engine.compare_answers(base_model, folder, prompt_v, parse_strengths(strengths_v),
                                        max_new_tokens=int(tokens_v or 128), temperature=float(temp_v or 0),
                                        seed=int(seed_v or 0), report=lambda text: progress(0, desc=text))
        return [[f"{a.strength:g}" + (" (base)" if a.strength == 0 else ""), a.text, a.new_tokens, a.seconds]
                for a in result]

    answer_btn.click(answer, [adapter, llm_base, llm_prompt, llm_strengths, max_tokens, temperature, llm_seed],
                     [answers], api_name="compare_llm_answers", concurrency_id="gpu", concurrency_limit=1)
    llm_refresh.click(lambda: gr.update(choices=_llm_runs(ctx, engine)), None, [adapter], api_visibility="private")
    adapter.input(lambda f: _base_for(f) or gr.skip(), [adapter], [llm_base], api_visibility="private")
    return {"llm_adapter": adapter, "llm_answers": answers}
