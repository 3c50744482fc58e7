"""The Training tab's settings form, generated from ``TrainConfig``'s field metadata.

Each field becomes one component (checkbox, dropdown, multiselect for lists, number or text box) with the
field's help text as its hint and its min/max as limits; "main" fields are shown, "advanced" and "llm" ones
are folded away (the tab unfolds "llm" for a language model). ``UI_GROUP`` moves a field to another group
on the page only (target_modules sits with the main settings: its choices follow the base model).
``form_to_config`` turns the form's values back into a validated ``TrainConfig`` (so a typo in the form
gives the same ``ConfigError`` sentence as a typo in a YAML file).
"""

from __future__ import annotations

import dataclasses
from dataclasses import fields
from typing import Any, Sequence

import gradio as gr

from ..config import GROUP_TITLES, PATH_KINDS, TrainConfig, field_kind, merge

# Fields the tab lays out itself (model and data row) rather than in the generic grid.
SPECIAL_FIELDS = ("base_model", "model_family", "train_data_dir")
UI_GROUP = {"target_modules": "main"}
PER_ROW = 3


def _kind(f: dataclasses.Field) -> str:
    return str(f.type).replace(" | None", "").replace("None | ", "")


def _optional(f: dataclasses.Field) -> bool:
    return "None" in str(f.type)


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


# Words of key names that are proper names or abbreviations, written as people write them.
PROPER_WORDS = {"lora": "LoRA", "vae": "VAE", "sdxl": "SDXL", "ema": "EMA", "clip": "CLIP", "t5": "T5", "llm": "LLM",
                "lr": "LR", "snr": "SNR", "gpu": "GPU", "gpus": "GPUs", "dora": "DoRA", "lokr": "LoKr",
                "loha": "LoHa", "fp8": "FP8", "nf4": "NF4", "4bit": "4-bit", "8bit": "8-bit", "id": "ID"}


def label_of(name: str) -> str:
    """``lora_rank`` -> ``LoRA rank (lora_rank)``: readable, proper names in their case, still the YAML key."""
    words = [PROPER_WORDS.get(w, w) for w in name.split("_")]
    first = words[0] if words[0] in PROPER_WORDS.values() else words[0][:1].upper() + words[0][1:]
    return f"{' '.join([first] + words[1:])} ({name})"


def to_component_value(f: dataclasses.Field, value: Any) -> Any:
    kind = _kind(f)
    if kind == "list[str]":
        return list(value) if value else []
    if value is None and (kind == "str" or _optional(f)):
        return ""
    if kind in ("int", "float") and _optional(f):
        return str(value)
    return value


def make_component(f: dataclasses.Field, value: Any, choices: Sequence[str] | None = None,
                   info: str | None = None) -> gr.components.Component:
    """The component for one config field, showing ``value`` (``choices`` for a list field's picker;
    ``info`` instead of the field's help). Its elem_id is ``cfg-<field name>``."""
    meta, kind, py_type = f.metadata, field_kind(f), _kind(f)
    common = {"label": label_of(f.name), "info": info or meta.get("help", ""), "elem_id": f"cfg-{f.name}"}
    value = to_component_value(f, value)
    if kind == "bool":
        return gr.Checkbox(value=bool(value), **common)
    if kind == "list":  # the tab sets the choices (e.g. a language model's layer names)
        return gr.Dropdown(choices=list(choices or value or []), value=value, multiselect=True,
                           allow_custom_value=True, **common)
    if kind == "choice":
        return gr.Dropdown(choices=list(meta["choices"]), value=value, **common)
    if kind == "number" and _optional(f):  # a Number cannot be empty: a text box, empty = default
        return gr.Textbox(value="" if value is None else str(value), placeholder="empty = default", **common)
    if kind == "number":
        step = 1 if py_type == "int" else (1e-6 if (default_of(f) or 1) < 0.01 else 0.01)
        return gr.Number(value=value, precision=0 if py_type == "int" else None, minimum=meta.get("min"),
                         maximum=meta.get("max"), step=step, **common)
    placeholder = PATH_PLACEHOLDERS.get(kind) if kind in PATH_KINDS else None
    if _optional(f):
        placeholder = f"empty = default; {placeholder}" if placeholder else "empty = default"
    return gr.Textbox(value=value, placeholder=placeholder, **common)


PATH_PLACEHOLDERS = {"model": "a folder, a .safetensors file or a hub id (owner/name)",
                     "data": "a folder (or a data file) on this computer", "file": "a file or folder on this computer",
                     "output": "a folder (created if missing)"}


def form_fields(group: str) -> list[dataclasses.Field]:
    """The fields shown in ``group`` on the page (config group, or ``UI_GROUP``'s override)."""
    return [f for f in fields(TrainConfig)
            if UI_GROUP.get(f.name, f.metadata.get("group")) == group and f.name not in SPECIAL_FIELDS]


def build_form(initial: TrainConfig, open_groups: Sequence[str] = (), containers: dict[str, Any] | None = None,
               overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, gr.components.Component]:
    """Lay out every field except ``SPECIAL_FIELDS``: main ones in rows, the other groups folded (unless
    named in ``open_groups``). ``containers``, when given, receives each folded group's accordion;
    ``overrides`` gives a field's component its ``choices`` or ``info``."""
    comps: dict[str, gr.components.Component] = {}
    for group, title in GROUP_TITLES.items():
        group_fields = form_fields(group)
        if not group_fields:
            continue
        container = gr.Group() if group == "main" else gr.Accordion(title, open=group in open_groups)
        if containers is not None and group != "main":
            containers[group] = container
        with container:
            for i in range(0, len(group_fields), PER_ROW):
                with gr.Row():
                    for f in group_fields[i:i + PER_ROW]:
                        comps[f.name] = make_component(f, getattr(initial, f.name), **(overrides or {}).get(f.name, {}))
    return comps


def _from_component(f: dataclasses.Field, value: Any) -> Any:
    kind = _kind(f)
    if isinstance(value, str):
        value = value.strip()
        if value == "" and _optional(f):
            return None
    if kind == "list[str]":
        raw = value if isinstance(value, (list, tuple)) else str(value or "").split(",")
        items = [str(v).strip() for v in raw if str(v).strip()]
        return items or None
    if kind in ("int", "float") and value is None and not _optional(f):
        return default_of(f)
    if kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def form_to_config(names: Sequence[str], values: Sequence[Any], base: TrainConfig | None = None) -> TrainConfig:
    """A validated config from the form's field names and values (ConfigError names the bad field)."""
    by_name = {f.name: f for f in fields(TrainConfig)}
    changes = {name: _from_component(by_name[name], value) for name, value in zip(names, values)}
    return merge(base or TrainConfig(), changes, source="the form")


def config_to_values(config: TrainConfig, names: Sequence[str]) -> list[Any]:
    """The form values showing ``config`` (in the order of ``names``)."""
    by_name = {f.name: f for f in fields(TrainConfig)}
    return [to_component_value(by_name[n], getattr(config, n)) for n in names]
