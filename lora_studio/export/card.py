"""The LoRA card: a ``README.md`` next to the exported LoRA, and the A1111 sidecar ``<name>.json``.

    write_card(run_folder, config, "sd15", files, tag_frequency, grid_image=None, captions=captions, steps=500)

The README says what the LoRA is and how to use it: base model, trigger words, the most frequent training
tags, the training settings, the strength grid when one was rendered, and how to load it in
AUTOMATIC1111/Forge (``<lora:name:0.8>``), ComfyUI (LoraLoader) and diffusers (``load_lora_weights``) - or,
for a language model adapter, in PEFT, llama.cpp and Ollama. Its YAML header is a Hugging Face model card,
so the folder can be pushed to the Hub as it is (``export.hub.push_to_hub``).

The sidecar is what A1111's Lora tab reads from ``<name>.json`` next to ``<name>.safetensors`` (keys from
its ``ui_edit_user_metadata.py``): ``description``, ``sd version`` (SD1, SD2, SDXL), ``activation text``
(added to the prompt with the LoRA), ``preferred weight``, ``negative text`` and ``notes``. A strength grid
is also copied to ``<name>.preview.png``, the preview image A1111 and Forge show on the LoRA's card.

Trigger words: ``config.trigger_word`` when the config has one, else the most frequent first tag of the
captions if it starts at least half of them (the captioning tools put the trigger first, exactly once).
``write_card`` can be called again later (e.g. after the Testing tab rendered a grid); it rewrites the card.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..data.tags import split_tags, top_tags
from ..families import get_family
from ..fileio import atomic_write_json, atomic_write_text

SD_VERSIONS = {"sd15": "SD1", "sd2": "SD2", "sdxl": "SDXL", "flux": "Flux", "chroma": "Flux",
               "sd3": "SD3", "flux2": "Flux2"}
FAMILY_TITLES = {"sd15": "Stable Diffusion 1.5", "sd2": "Stable Diffusion 2.x", "sdxl": "SDXL", "flux": "FLUX.1",
                 "chroma": "Chroma", "llm": "causal language model",
                 "sd3": "SD3.5", "flux2": "FLUX.2"}
# ComfyUI node that loads the base model: a transformer-only file (FLUX.1, Chroma) goes in "Load Diffusion Model"
COMFY_LOADERS = {"flux": "Load Diffusion Model", "chroma": "Load Diffusion Model",
                 "flux2": "Load Diffusion Model"}
# Qwen-Image, Z-Image: transformer-only files too (text encoder and VAE in their own loader nodes)
FAMILY_TITLES.update(qwen_image="Qwen-Image", z_image="Z-Image")
COMFY_LOADERS.update(qwen_image="Load Diffusion Model", z_image="Load Diffusion Model")
PREFERRED_WEIGHT = 0.8
TOP_TAGS = 20
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def trigger_words(config: Any, captions: Sequence[str] | None = None) -> list[str]:
    """The words that switch the LoRA on: the config's trigger word, else the usual first caption tag."""
    configured = getattr(config, "trigger_word", None) or getattr(config, "trigger", None)
    if configured:
        return [t for t in split_tags(str(configured))] or [str(configured).strip()]
    firsts = Counter(tags[0] for tags in (split_tags(c or "") for c in captions or ()) if tags)
    if not firsts:
        return []
    tag, count = firsts.most_common(1)[0]
    return [tag] if count * 2 >= len(captions or ()) else []


def _lora_file(files: Sequence[str | Path]) -> Path | None:
    """The file a user loads: the kohya ``.safetensors`` (images) or the adapter folder (LLMs)."""
    paths = [Path(f) for f in files]
    for p in paths:
        if p.suffix == ".safetensors":
            return p
    return paths[0] if paths else None


def _is_hub_id(base_model: str) -> bool:
    return bool(_HUB_ID.match(base_model)) and not Path(base_model).expanduser().exists()


def _run_state(run_path: Path) -> dict[str, Any]:
    try:
        return json.loads((run_path / "job.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def settings_rows(config: Any, family: str, state: Mapping[str, Any], steps: int | None,
                  num_images: int | None) -> list[tuple[str, Any]]:
    """(setting, value) rows for the card's training table."""
    processes = int(state.get("num_processes") or 1)
    effective = state.get("effective_batch") or config.batch_size * config.gradient_accumulation_steps * processes
    rows: list[tuple[str, Any]] = [
        ("base model", config.base_model), ("model family", FAMILY_TITLES.get(family, family)),
        ("network type", getattr(config, "network_type", "lora")),
        ("LoRA rank / alpha", f"{config.lora_rank} / {config.alpha:g}"),
        ("steps", steps if steps is not None else state.get("step", "")),
        ("batch size x accumulation x GPUs", f"{config.batch_size} x {config.gradient_accumulation_steps} x "
                                             f"{processes} = {effective}"),
        ("learning rate", f"{config.learning_rate:g} ({config.lr_scheduler}, warm-up {config.lr_warmup_steps})"),
        ("optimizer", config.optimizer), ("mixed precision", config.mixed_precision), ("seed", config.seed),
    ]
    if getattr(config, "ema_decay", None):
        rows.append(("EMA of the weights", f"decay {config.ema_decay:g} (this file holds the average)"))
    if family == "llm":
        rows.append(("max sequence length", config.max_seq_length))
    else:
        rows += [("resolution", config.resolution_for(family)),
                 ("text encoder trained", "yes" if config.train_text_encoder else "no")]
        if config.noise_offset:
            rows.append(("noise offset", config.noise_offset))
        if config.min_snr_gamma:
            rows.append(("min-SNR gamma", config.min_snr_gamma))
    if num_images is not None:
        rows.append(("training images" if family != "llm" else "training examples", num_images))
    return rows


def _recommended_lines(state: Mapping[str, Any], name: str) -> list[str]:
    """The "Recommended checkpoint" section: the saved LoRA with the lowest validation loss (``job.json``)."""
    rec = state.get("recommended")
    if not rec:
        return []
    if rec.get("final"):
        where = f"this file, the final LoRA (step {rec['step']})"
    else:
        folder = Path(str(rec.get("checkpoint") or ""))
        where = (f"**the checkpoint at step {rec['step']}** (`checkpoints/{folder.name}/`), not the final file: "
                 "later steps scored worse on the held-out data")
    return ["## Recommended checkpoint", "",
            f"Lowest validation loss ({rec['val_loss']:.5g}, measured on held-out data the LoRA never trained on): "
            f"{where}.", ""]


def _front_matter(config: Any, family: str, triggers: list[str]) -> str:
    tags = ["lora", "lora-studio"] + (["text-generation", "peft"] if family == "llm" else
                                      ["text-to-image", "stable-diffusion", "diffusers"])
    lines = ["---", "tags:"] + [f"- {t}" for t in tags]
    if _is_hub_id(config.base_model):
        lines.append(f"base_model: {config.base_model}")
    if family == "llm":
        lines.append("library_name: peft")
    else:
        lines.append("library_name: diffusers")
        if triggers:
            lines.append(f"instance_prompt: {json.dumps(', '.join(triggers), ensure_ascii=False)}")
    lines.append("---")
    return "\n".join(lines)


def _pipeline_name(entry: Any, base_model: str) -> str:
    """The pipeline class a user loads the base model with: the one its ``model_index.json`` names (FLUX.2 dev and
    klein share a family), else the family's."""
    from ..models.detect import _hub_folder, _read_json, is_local

    folder = Path(base_model).expanduser() if is_local(base_model) else _hub_folder(base_model)
    named = _read_json(folder / "model_index.json").get("_class_name", "") if folder else ""
    default = (entry.pipeline or "diffusers:StableDiffusionPipeline").partition(":")[2]
    return named if named.endswith("Pipeline") else default


def _image_usage(name: str, file_name: str, config: Any, family: str, triggers: list[str],
                 has_diffusers_folder: bool) -> list[str]:
    trigger = ", ".join(triggers)
    prompt = f"{trigger}, " if trigger else ""
    entry = get_family(family)
    pipe_class = _pipeline_name(entry, str(config.base_model))
    base = config.base_model if _is_hub_id(config.base_model) else "path/to/base-model"
    dtype = entry.half_dtype
    out = [
        "## How to use it", "",
        "### AUTOMATIC1111 / Forge", "",
        f"Copy `{file_name}` (with `{name}.json` and `{name}.preview.png` if present) into `models/Lora`, then "
        "write in the prompt:", "",
        "```", f"{prompt}<lora:{name}:{PREFERRED_WEIGHT}>", "```", "",
        f"`{name}.json` fills the Lora tab's card: activation text, preferred weight {PREFERRED_WEIGHT}, "
        "description.", "",
        "### ComfyUI", "",
        f"Copy `{file_name}` into `ComfyUI/models/loras`. Add a **Load LoRA** node (LoraLoader) between "
        f"**{COMFY_LOADERS.get(family, 'Load Checkpoint')}** and the CLIP Text Encode / "
        "KSampler nodes, pick the file, set `strength_model` "
        f"to {PREFERRED_WEIGHT}" + (f" and `strength_clip` to {PREFERRED_WEIGHT}" if config.train_text_encoder
                                    else " (`strength_clip` has no effect: the text encoder was not trained)") + ".",
        "",
    ]
    out += _diffusers_usage(name, file_name, config, pipe_class, base, prompt, dtype)
    if has_diffusers_folder:
        out += ["The `diffusers/` folder holds the same LoRA in diffusers' own format "
                "(`pipe.load_lora_weights(\"diffusers\")`).", ""]
    return out


def _diffusers_usage(name: str, file_name: str, config: Any, pipe_class: str, base: str, prompt: str,
                     dtype: str = "float16") -> list[str]:
    kind = getattr(config, "network_type", "lora")
    if kind != "lora":
        return ["### diffusers", "",
                f"This is a {kind.upper() if kind == 'dora' else kind.capitalize()} file (LyCORIS keys). diffusers' "
                "`load_lora_weights` cannot load LoKr/LoHa and applies DoRA's `dora_scale` differently from "
                "A1111/Forge and ComfyUI; LoRA Studio loads it through PEFT as those tools apply it "
                "(`lora_studio.export.lycoris.load_into_pipeline(pipe, path, family, name)`).", ""]
    return ["### diffusers", "",
            "```python", "import torch", f"from diffusers import {pipe_class}", "",
            f'pipe = {pipe_class}.from_pretrained("{base}", torch_dtype=torch.{dtype}).to("cuda")',
            f'pipe.load_lora_weights(".", weight_name="{file_name}", adapter_name="{name}")',
            f'pipe.set_adapters(["{name}"], adapter_weights=[{PREFERRED_WEIGHT}])',
            f'image = pipe("{prompt}your prompt").images[0]', "```", ""]


def _llm_usage(name: str, file_name: str, config: Any) -> list[str]:
    base = config.base_model if _is_hub_id(config.base_model) else "path/to/base-model"
    return [
        "## How to use it", "",
        "### PEFT / transformers", "",
        "```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f'model = AutoModelForCausalLM.from_pretrained("{base}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{base}")',
        f'model = PeftModel.from_pretrained(model, "{file_name}")', "```", "",
        "### llama.cpp / Ollama", "",
        f"Convert with llama.cpp: `python convert_lora_to_gguf.py {file_name} --base {base}`, then in an Ollama "
        f"Modelfile: `FROM <the base model>` and `ADAPTER ./{name}.gguf`.", "",
    ]


def write_card(run_folder: Any, config: Any, family: str, files: Sequence[str | Path],
               tag_frequency: Mapping[str, Mapping[str, int]] | None, grid_image: str | Path | None = None, *,
               captions: Sequence[str] | None = None, steps: int | None = None,
               num_images: int | None = None) -> list[Path]:
    """Write ``README.md`` (and for images ``<name>.json`` and ``<name>.preview.png``) into the run folder.

    ``run_folder`` is a ``RunFolder`` or a path; ``files`` are the exported files (the kohya file or the
    adapter folder first); ``tag_frequency`` is ``{folder: {tag: count}}`` (``data.tags.tag_frequency``).
    Returns the paths written.
    """
    run_path = Path(getattr(run_folder, "path", run_folder))
    name = config.output_name
    lora = _lora_file(files)
    file_name = lora.name if lora else f"{name}.safetensors"
    triggers = trigger_words(config, captions)
    tags = top_tags(tag_frequency or {}, TOP_TAGS)
    state = _run_state(run_path)
    written: list[Path] = []

    preview: Path | None = None
    if family != "llm":
        target = run_path / f"{name}.preview.png"
        if grid_image and Path(grid_image).is_file():
            if Path(grid_image).resolve() != target.resolve():
                shutil.copyfile(grid_image, target)
            preview = target
            written.append(preview)
        elif target.is_file():  # a grid copied by an earlier call: keep showing it
            preview = target

    title = FAMILY_TITLES.get(family, family)
    lines = [_front_matter(config, family, triggers), "", f"# {name}", "",
             f"A LoRA for {title}, trained with LoRA Studio on `{config.base_model}`.", ""]
    if preview:
        lines += [f"![Strength grid: the same prompt and seed at several LoRA strengths]({preview.name})", ""]
    if family != "llm":
        lines += ["## Trigger words", "",
                  (f"`{', '.join(triggers)}` - put it at the start of the prompt." if triggers else
                   "None: the captions have no common first tag, so the LoRA acts on its training subjects' "
                   "usual words (see the tags below)."), ""]
    if tags:
        lines += ["## Most frequent training tags", "", "| tag | count |", "| --- | ---: |"]
        lines += [f"| {_cell(tag)} | {count} |" for tag, count in tags]
        lines.append("")
    lines += _recommended_lines(state, name)
    lines += ["## Training settings", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in settings_rows(config, family, state, steps, num_images)]
    lines.append("")
    lines += (_llm_usage(name, file_name, config) if family == "llm" else
              _image_usage(name, file_name, config, family, triggers,
                           any(Path(f).name == "diffusers" and Path(f).is_dir() for f in files)))
    lines += ["## Files", ""] + [f"- `{Path(f).name}{'/' if Path(f).is_dir() else ''}`" for f in files] + [""]
    readme = atomic_write_text(run_path / "README.md", "\n".join(lines))
    written.insert(0, readme)

    if family != "llm" and Path(file_name).stem != "job":  # never overwrite the run's job.json
        base = Path(config.base_model).name or config.base_model
        done = steps if steps is not None else state.get("step", "?")
        sidecar = {
            "description": f"{title} LoRA trained with LoRA Studio on {base} ({done} steps, rank {config.lora_rank}).",
            "sd version": SD_VERSIONS.get(family, "Unknown"),
            "activation text": ", ".join(triggers),
            "preferred weight": PREFERRED_WEIGHT,
            "negative text": "",
            "notes": "Most frequent tags: " + ", ".join(t for t, _ in tags[:10]) if tags else "",
        }
        written.insert(1, atomic_write_json(run_path / f"{Path(file_name).stem}.json", sidecar))
    return written
