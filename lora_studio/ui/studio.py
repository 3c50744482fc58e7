"""The whole app: one ``gr.Blocks`` with the four tabs, wired to each other.

    blocks = build_studio(StudioContext(outputs="outputs"))
    blocks.launch(**launch_options(ctx), ...)

The dataset chosen in the Dataset tab flows into the Captioning and Training tabs; opening the Testing
tab refreshes its list of LoRA files; loading the page re-attaches the Training tab to a running job.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from ..hardware import describe_device
from .caption_tab import build_caption_tab
from .context import StudioContext
from .dataset_tab import build_dataset_tab
from .security import MAX_UPLOAD
from .test_tab import build_test_tab
from .train_tab import build_train_tab

CSS = """
.ls-progress { margin: 4px 0 2px 0; }
.ls-progress-label { font-size: 0.95em; margin-bottom: 4px; }
.ls-progress-track { width: 100%; height: 14px; border-radius: 7px; background: var(--neutral-200); overflow: hidden; }
.ls-progress-fill { height: 100%; border-radius: 7px; transition: width 0.4s ease; }
.ls-header h1 { margin-bottom: 0; }
"""


def _header(ctx: StudioContext) -> str:
    mode = ""
    if ctx.demo:
        mode = (" &middot; **demo mode**: miniature models trained by the project on a world of coloured shapes "
                "(64 px pictures); teach them the pink-background concept `zubi`" if ctx.demo.miniature
                else " &middot; **demo mode**: tiny offline model, pictures are noise, the workflow is real")
    shared = " &middot; shared: typed paths must lie in the outputs or models folder" if ctx.shared else ""
    device, warning = describe_device()
    warning_line = f"\n\n**Warning:** {warning}" if warning else ""
    return (f"# LoRA Studio\nTrain LoRAs for Stable Diffusion 1.5, SDXL and language models: "
            f"**1** pick images, **2** caption them, **3** train, **4** compare strengths.{mode}{shared}\n\n"
            f"Device: {device} &middot; Outputs: `{ctx.outputs}`{warning_line}")


def build_studio(ctx: StudioContext) -> gr.Blocks:
    """Build the app (not launched)."""
    with gr.Blocks(title="LoRA Studio") as blocks:
        gr.Markdown(_header(ctx), elem_classes=["ls-header"])
        with gr.Tabs():
            with gr.Tab("1. Dataset", id="dataset"):
                dataset = build_dataset_tab(ctx)
            with gr.Tab("2. Captioning", id="caption"):
                caption = build_caption_tab(ctx)
            with gr.Tab("3. Training", id="train"):
                train = build_train_tab(ctx)
            with gr.Tab("4. Testing", id="test") as test_tab:
                test = build_test_tab(ctx)
        _wire(blocks, dataset, caption, train, test, test_tab)
    return blocks


def _wire(blocks: gr.Blocks, dataset: dict, caption: dict, train: dict, test: dict, test_tab: gr.Tab) -> None:
    def pass_dataset(folder: str):
        if not folder:
            return gr.skip(), gr.skip()
        return folder, folder

    def load_captions_if_set(folder: str, family: str | None = None, base_model: str = ""):
        if not folder:
            return gr.skip(), gr.skip()
        try:
            return caption["load_fn"](folder, family, base_model)
        except gr.Error:
            return gr.skip(), gr.skip()

    caption_listing = [caption["folder"], caption["family"], caption["base_model"]]

    dataset["dataset_dir"].change(pass_dataset, [dataset["dataset_dir"]], [caption["folder"], train["train_data_dir"]],
                                  api_visibility="private").then(
        load_captions_if_set, caption_listing, [caption["table"], caption["status"]], api_visibility="private")
    test_tab.select(test["refresh"], [test["lora"], test["base"]], [test["lora"], test["base"]],
                    api_visibility="private")
    blocks.load(load_captions_if_set, caption_listing, [caption["table"], caption["status"]],
                api_visibility="private")
    _wire_caption_family(blocks, train, caption)
    train["attach"](blocks)


def _wire_caption_family(blocks: gr.Blocks, train: dict, caption: dict) -> None:
    """The Captioning tab's target family (hence caption style and token check) follows the Training tab's model."""
    from .caption_choice import family_from_training

    def follow(base_model: str, model_family: str):
        family, model = family_from_training(base_model, model_family)
        return (family or gr.skip()), model

    inputs, outputs = [train["base_model"], train["model_family"]], [caption["family"], caption["base_model"]]
    for source in inputs:
        source.change(follow, inputs, outputs, api_visibility="private")
    blocks.load(follow, inputs, outputs, api_visibility="private")


def launch_options(ctx: StudioContext) -> dict[str, Any]:
    """The ``launch()`` keywords that keep the app safe and styled: served folders, upload size, theme."""
    return {"allowed_paths": ctx.served_paths(), "max_file_size": MAX_UPLOAD, "css": CSS,
            "theme": gr.themes.Soft(primary_hue="indigo", secondary_hue="slate"), "footer_links": ["api", "settings"]}
