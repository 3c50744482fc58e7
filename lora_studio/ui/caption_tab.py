"""Captioning tab: caption with BLIP, Florence-2, Qwen-VL, JoyCaption, WD14 tags and/or CLIP style tags, in the
style of the model you will train; edit in a table, batch edits with preview, save.

"Run" captions the images that have no caption yet (or all, with "Replace existing"), with a progress bar
and a Cancel button (what was captioned before Cancel is kept). Several ticked captioners are joined: the
sentence first, tags after it. The target family (it follows the Training tab's base model) sets the
caption style (tags, short sentence, detailed paragraph) and the token count column, which flags captions
the family's text encoder will cut. Clicking a row selects its image: "Re-caption" runs the ticked
captioners on it alone, and "Compare" runs two captioners side by side on it, to keep one or merge them.
Nothing is written until "Save", which writes ``metadata.csv`` and/or ``.txt`` files atomically (the
previous versions are kept as ``.bak``).
"""

from __future__ import annotations

import gradio as gr

from ..captioning.florence import FLORENCE_TASKS
from ..captioning.joycaption import CAPTION_LENGTHS, CAPTION_TYPES
from ..captioning.style import STYLE_DEFAULTS, STYLES, TRIGGER_PLACEMENTS
from .caption_choice import CHOICES, FAMILY_CHOICES, HEADERS, ONE_CAPTIONER, SETUP_FIELDS, family_style
from .caption_handlers import CaptionActions
from .context import StudioContext

CAPTIONERS = tuple(CHOICES)
SAVE_FORMATS = ("metadata.csv", ".txt files")


def _setup_components(ctx: StudioContext) -> dict[str, gr.components.Component]:
    """The captioner settings (models and options), in ``CaptionSetup`` order."""
    from ..captioning.choose import default_model
    from ..captioning.clip_tags import DEFAULT_CLIP

    demo = ctx.demo
    c: dict[str, gr.components.Component] = {}
    with gr.Accordion("Captioning models (hub id or folder)", open=False):
        with gr.Row():
            c["blip_model"] = gr.Textbox(label="BLIP", value=str(demo.blip) if demo else default_model("blip"))
            c["clip_model"] = gr.Textbox(label="CLIP (style tags)", value=str(demo.clip) if demo else DEFAULT_CLIP)
            c["florence_model"] = gr.Textbox(label="Florence-2", value=default_model("florence2"))
        with gr.Row():
            c["qwen_model"] = gr.Textbox(label="Qwen-VL", value=default_model("qwen-vl"))
            c["joy_model"] = gr.Textbox(label="JoyCaption", value=default_model("joycaption"))
            c["wd14_model"] = gr.Textbox(label="WD14 tagger", value=default_model("wd14"))
    with gr.Row():
        c["family"] = gr.Dropdown(FAMILY_CHOICES, value="sd15", label="Target model family",
                                  info="Follows the Training tab's base model; sets the style and the token check.")
        c["style"] = gr.Radio([(label, key) for key, label in STYLES.items()], value="short", label="Caption style")
        c["trigger_placement"] = gr.Dropdown(list(TRIGGER_PLACEMENTS), value="start", label="Trigger word goes",
                                             info="A caption with [trigger] gets it there.")
    c["base_model"] = gr.Textbox(value="", visible=False)  # the Training tab's base model: exact token counts
    with gr.Accordion("Captioner options", open=False):
        with gr.Row():
            c["task"] = gr.Dropdown([("from the style", "")] + [(k.replace("_", " "), k) for k in FLORENCE_TASKS],
                                    value="", label="Florence-2 task")
            c["instruction"] = gr.Textbox(label="Qwen-VL / JoyCaption instruction (empty: from the style)", lines=2,
                                          value="",
                                          placeholder=STYLE_DEFAULTS["short"].instruction, scale=3)
            c["four_bit"] = gr.Checkbox(label="Qwen-VL in 4-bit (CUDA GPU)", value=False)
        with gr.Row():
            c["joy_type"] = gr.Dropdown([("from the style", "")] + [(k.replace("_", " "), k) for k in CAPTION_TYPES],
                                        value="", label="JoyCaption caption type")
            c["joy_length"] = gr.Dropdown([("from the style", "")] + list(CAPTION_LENGTHS), value="",
                                          allow_custom_value=True, label="JoyCaption length (or a number of words)")
            c["temperature"] = gr.Number(value=-1, label="Temperature (-1: the model's own; 0: same every run)")
        with gr.Row():
            c["general_threshold"] = gr.Slider(0.0, 1.0, value=0.35, step=0.01, label="WD14 general tag threshold")
            c["character_threshold"] = gr.Slider(0.0, 1.0, value=0.85, step=0.01, label="WD14 character threshold")
            c["exclude"] = gr.Textbox(label="WD14 tags to leave out (comma separated)", value="")
            c["underscores_to_spaces"] = gr.Checkbox(label="long_hair -> long hair", value=True)
            c["rating"] = gr.Checkbox(label="Add the rating tag", value=False)
        c["max_tokens"] = gr.Number(value=0, precision=0, label="Longest caption in generated tokens (0: style)")
    return c


def build_caption_tab(ctx: StudioContext) -> dict[str, gr.components.Component]:
    """Build the Captioning tab's components and events; returns the components by id."""
    demo = ctx.demo
    gr.Markdown("Auto-caption the images, then read and fix the captions. A **trigger word** (a made-up word "
                "such as `mystyle`) in every caption is what you will type later to call the LoRA. FLUX, SD3.5 "
                "and Qwen-Image learn from detailed sentences; SD1.5/SDXL from short ones; anime models from tags.")
    with gr.Row(equal_height=True):
        folder = gr.Textbox(label="Image folder", value=str(demo.images) if demo else "", scale=5)
        load_btn = gr.Button("Load captions", scale=1)
    with gr.Row():
        kinds = gr.CheckboxGroup(list(CAPTIONERS), value=["BLIP caption"], label="Captioners",
                                 info="Sentence captioners write a description; WD14 and CLIP add tags after it.")
        trigger = gr.Textbox(label="Trigger word", value=demo.trigger if demo else "", placeholder="mystyle")
        overwrite = gr.Checkbox(label="Replace existing captions", value=False,
                                info="Off: only images without a caption are captioned.")
    setup = _setup_components(ctx)
    setup_inputs = [setup[name] for name in SETUP_FIELDS]
    with gr.Row():
        run_btn = gr.Button("Run captioning", variant="primary")
        cancel_btn = gr.Button("Cancel", variant="stop")
    status = gr.Markdown(elem_id="caption-status")
    table = gr.Dataframe(headers=HEADERS, datatype=["html", "str", "str", "str"], row_count=0,
                         label="Captions (click a caption to edit, a row to select its image)", interactive=True,
                         static_columns=[0, 1, 3], column_widths=["80px", "20%", "64%", "10%"], wrap=True,
                         max_height=460)
    one = _one_image_section()
    edit = _batch_edit_section()
    with gr.Row(equal_height=True):
        formats = gr.CheckboxGroup(list(SAVE_FORMATS), value=list(SAVE_FORMATS), label="Save as")
        save_btn = gr.Button("Save captions", variant="primary")
    save_status = gr.Markdown(elem_id="caption-save-status")

    actions = CaptionActions(ctx)
    family, base_model = setup["family"], setup["base_model"]
    edit_inputs = [trigger, *edit["inputs"]]
    load_btn.click(actions.load, [folder, family, base_model], [table, status], api_name="load_captions")
    run_evt = run_btn.click(actions.run, [folder, kinds, trigger, overwrite, *setup_inputs], [table, status],
                            api_name="run_captioning", concurrency_id="gpu", concurrency_limit=1)
    cancel_btn.click(actions.cancel, None, [status], api_name="cancel_captioning", queue=False)
    family.change(family_style, [family, base_model], [setup["style"]], api_visibility="private")
    table.select(actions.select, [table], [one["selected"]], api_visibility="private")
    one["recaption"].click(actions.recaption, [folder, table, one["selected"], kinds, trigger, *setup_inputs],
                           [table, status], api_name="recaption_image", concurrency_id="gpu")
    one["compare"].click(actions.compare, [folder, one["selected"], one["a"], one["b"], *setup_inputs],
                         [one["text_a"], one["text_b"]], api_name="compare_captioners", concurrency_id="gpu")
    pick_inputs = [folder, table, one["selected"], trigger, setup["trigger_placement"], family, base_model]
    one["use_a"].click(actions.set_caption, [*pick_inputs, one["text_a"]], [table, status], api_name="use_caption_a")
    one["use_b"].click(actions.set_caption, [*pick_inputs, one["text_b"]], [table, status], api_name="use_caption_b")
    one["merge"].click(actions.merge, [*pick_inputs, one["text_a"], one["text_b"], one["a"], one["b"]],
                       [table, status], api_name="merge_captions")
    edit["preview_btn"].click(actions.preview, [table, *edit_inputs], [edit["preview"]],
                              api_name="preview_caption_edit")
    edit["apply_btn"].click(actions.apply, [folder, table, family, base_model, *edit_inputs], [table, save_status],
                            api_name="apply_caption_edit")
    save_btn.click(actions.save, [folder, table, formats], [save_status], api_name="save_captions")
    return {"folder": folder, "table": table, "status": status, "run": run_btn, "cancel": cancel_btn,
            "save": save_btn, "save_status": save_status, "trigger": trigger, "run_event": run_evt,
            "load_fn": actions.load, "family": family, "style": setup["style"], "base_model": base_model}


def _one_image_section() -> dict[str, gr.components.Component]:
    c: dict[str, gr.components.Component] = {}
    with gr.Accordion("One image: re-caption it, or compare two captioners on it", open=False):
        with gr.Row(equal_height=True):
            c["selected"] = gr.Textbox(label="Selected image (click a row)", scale=3)
            c["recaption"] = gr.Button("Re-caption with the ticked captioners", scale=2)
        with gr.Row():
            c["a"] = gr.Dropdown(ONE_CAPTIONER, value="Florence-2", label="Captioner A")
            c["b"] = gr.Dropdown(ONE_CAPTIONER, value="WD14 tags", label="Captioner B")
            c["compare"] = gr.Button("Compare on this image")
        with gr.Row():
            c["text_a"] = gr.Textbox(label="A", lines=4)
            c["text_b"] = gr.Textbox(label="B", lines=4)
        with gr.Row():
            c["use_a"] = gr.Button("Use A")
            c["use_b"] = gr.Button("Use B")
            c["merge"] = gr.Button("Merge (tags after the sentence)")
    return c


def _batch_edit_section() -> dict:
    with gr.Accordion("Batch edit (preview before applying)", open=False):
        with gr.Row():
            prefix = gr.Textbox(label="Add at the start")
            suffix = gr.Textbox(label="Add at the end")
            remove = gr.Textbox(label="Remove tags (comma separated)")
        with gr.Row():
            find = gr.Textbox(label="Find")
            replace = gr.Textbox(label="Replace with")
            regex = gr.Checkbox(label="Regular expression")
            dedupe = gr.Checkbox(label="Remove repeated tags")
            lowercase = gr.Checkbox(label="Lower-case")
        with gr.Row():
            preview_btn = gr.Button("Preview")
            apply_btn = gr.Button("Apply to the table")
        preview = gr.Dataframe(headers=["file", "before", "after"], interactive=False, wrap=True, max_height=300)
    return {"inputs": [prefix, suffix, remove, find, replace, regex, dedupe, lowercase], "preview": preview,
            "preview_btn": preview_btn, "apply_btn": apply_btn}
