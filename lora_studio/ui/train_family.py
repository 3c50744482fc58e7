"""What the base model's family decides in the Training tab (no gradio here, so it is testable directly).

    choices = family_choices("/models/tiny-llm", "auto", gpu_gb=16.0)
    choices.family        # "llm"
    choices.presets       # [("none: keep the settings below", ""), ("llm_12gb: ...", "llm_12gb"), ...]
    choices.preset        # "llm_16gb" (the engine's recommendation for the GPU; "" without a GPU)
    choices.targets       # the model's Linear layer names (q_proj, k_proj, ...) for target_modules
    choices.target_value  # ["q_proj", "v_proj"]
    choices.llm           # True: a language model (its layer names, q_proj/v_proj picked)
    choices.group         # "llm": the settings group the tab unfolds (the registry's settings_group)

Everything comes from the engine: ``models.detect.family_info`` (family, its presets, the recommended
preset) and ``models.llm.linear_module_names`` (the layer names a LoRA can target).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..config import TrainConfig
from ..families import get_family
from ..errors import StudioError
from ..models.detect import family_info
from ..presets import get_preset

log = logging.getLogger(__name__)

NO_PRESET = ("none: keep the settings below", "")
FALLBACK_FAMILY = "sd15"  # presets and estimate when the family cannot be told (no model picked yet)


@dataclass(frozen=True)
class FamilyChoices:
    family: str
    text: str
    presets: list[tuple[str, str]]
    preset: str = ""
    targets: list[str] = field(default_factory=list)
    target_value: list[str] = field(default_factory=list)
    target_info: str = ""
    llm: bool = False
    group: str = ""  # the settings group the tab unfolds for the family (llm, flow: FLUX and Chroma)


def family_of(base_model: str, family: str = "auto") -> str:
    """The family of ``base_model`` (``family`` when it is not auto); SD1.5 when it cannot be told."""
    try:
        return family_info(base_model, family).family
    except StudioError:
        return family if family and family != "auto" else FALLBACK_FAMILY


def preset_choices(preset_names: list[str]) -> list[tuple[str, str]]:
    return [NO_PRESET] + [(f"{name}: {get_preset(name).description}", name) for name in preset_names]


def llm_layer_names(base_model: str) -> list[str]:
    """The model's Linear layer names, or [] when the model cannot be read."""
    from ..models.llm import linear_module_names

    try:
        return linear_module_names(base_model)
    except Exception as exc:  # noqa: BLE001 - a model that cannot be read keeps the default help
        log.debug("no layer names for %s: %s", base_model, exc)
        return []


def targets_info(base_model: str, family: str, names: list[str] | None = None) -> str:
    """Help for target_modules: for a language model, the Linear layer names it actually has."""
    entry = get_family(family)
    if entry.targets_help:
        return entry.targets_help
    if family != "llm":
        return ("Layers that get a LoRA: pick or type names (Enter adds one). Empty: "
                f"{', '.join(entry.default_targets)}.")
    names = llm_layer_names(base_model) if names is None else names
    found = ", ".join(names) if names else "(could not read the model)"
    default = ", ".join(get_family("llm").default_targets)
    return (f"Layers that get a LoRA (empty: {default}). This model's Linear layers: "
            f"{found}.")


SINGLE_FILE_NOTE = (" A single-file checkpoint: its configs and tokenizer come from the hub the first time (a few "
                    "MB); offline, set *Single file config* (`single_file_config`, under Advanced) to a diffusers "
                    "folder of the same family.")


VARIANT_NAMES = {"dev": "dev", "klein9b": "klein 9B", "medium": "Medium"}  # Family.variant_of -> words


def _family_line(info_name: str, family: str, recommended: str | None, base_model: str = "",
                 gpu_gb: float | None = None, variant: str = "") -> str:
    model = f" {VARIANT_NAMES.get(variant, variant)}" if variant else ""
    text = f"Model family: **{info_name}{model}** (`{family}`)."
    if recommended:
        from ..presets import get_preset

        vram = get_preset(recommended).vram_gb
        if gpu_gb and vram * 0.93 > gpu_gb:  # Qwen-Image on a 12 GB card: no preset fits
            text += (f" No preset of this family fits this GPU's {gpu_gb:.0f} GB: the smallest, `{recommended}`, "
                     f"is made for {vram:g} GB.")
        else:
            text += f" Recommended preset for this GPU: `{recommended}`."
    if Path(base_model).expanduser().is_file():
        text += SINGLE_FILE_NOTE
    return text


def family_choices(base_model: str, family: str = "auto", gpu_gb: float | None = None,
                   current_targets: list[str] | None = None, preselect: bool = True) -> FamilyChoices:
    """The family line, the preset list and preselection, and the target_modules choices for a base model.

    ``current_targets`` are kept when they are all among the new choices; otherwise the family's default
    is shown (``q_proj, v_proj`` for a language model, empty = the UNet default for images).
    """
    base_model = (base_model or "").strip()
    if not base_model and (not family or family == "auto"):
        info = family_info("", FALLBACK_FAMILY)
        text = "Pick or type a base model."
    else:
        try:
            info = family_info(base_model, family)
        except StudioError as exc:
            info = family_info(base_model, FALLBACK_FAMILY)
            text = f"Model family: unknown. {exc}"
        else:
            text = ""
    best = info.recommended_preset(gpu_gb)
    recommended = best if preselect else None
    text = text or _family_line(info.name, info.family, best, base_model, gpu_gb, info.variant)
    llm = info.family == "llm"
    if llm:
        names = llm_layer_names(base_model)
        targets = names or list(get_family("llm").default_targets)
        default = [n for n in get_family("llm").default_targets if n in targets]
    else:
        entry = get_family(info.family)
        names, targets, default = [], list(entry.target_choices or entry.default_targets), []
    current = list(current_targets or [])
    value = current if current and all(t in targets for t in current) else default
    return FamilyChoices(family=info.family, text=text, presets=preset_choices(info.presets),
                         preset=recommended or "", targets=targets, target_value=value,
                         target_info=targets_info(base_model, info.family, names), llm=llm,
                         group=get_family(info.family).settings_group)


def estimate_family(cfg: TrainConfig) -> str:
    """The family the memory estimate uses for ``cfg`` (its model_family, else detected from base_model)."""
    return family_of(cfg.base_model, cfg.model_family)
