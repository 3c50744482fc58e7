"""Load FLUX.2 pipelines and transformers (klein with Qwen3, dev with Mistral 3): a diffusers folder, a hub id,
or one single-file transformer checkpoint.

    pipe = load_flux2_pipeline("black-forest-labs/FLUX.2-klein-base-4B", "flux2")
    pipe = load_flux2_pipeline("flux-2-klein-base-4b.safetensors", "flux2", single_file_config="/models/klein-4b")
    model_render_defaults("/models/FLUX.2-klein-4B", "flux2")    # {"steps": 4, "cfg": 1.0}: step-distilled

Which pipeline class a folder is, its ``model_index.json`` tells (``Flux2KleinPipeline`` or ``Flux2Pipeline``). A
single file is the transformer alone in Black Forest Labs' layout, which diffusers' ``from_single_file`` converts;
the rest (VAE, text encoder, tokenizer, scheduler, configs) comes from ``single_file_config`` (a diffusers folder or
hub id of the same model), else from klein base 4B on the hub (``DEFAULT_CONFIG``). Render settings: a
step-distilled klein (``is_distilled``) 4 steps without CFG, a base model 50 steps at CFG 4, dev 50 at guidance 4
(its guidance embedding). Every load holds the process-wide model-loading lock.

dev's tokenizer slot is a ``PixtralProcessor``, which transformers builds only with torchvision installed (the
launchers install torch alone). Without torchvision the processor's tokenizer is loaded by itself with the
processor's chat template (``tokenizer/chat_template.json`` or ``.jinja``): ``Flux2Pipeline.encode_prompt`` only
renders the system message and the caption through that template and tokenizes them, which the tokenizer does
as the processor does for text.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

from ..errors import ModelLoadError
from ..families import get_family
from .flux_loading import _local_only, _source
from .transformer_loading import load_pipeline_files, load_transformer_files, read_transformer_config

DEFAULT_CONFIG = "black-forest-labs/FLUX.2-klein-base-4B"
DISTILLED_RENDER = {"steps": 4, "cfg": 1.0}


def _model_file(source: str, name: str, online: bool = False) -> Path | None:
    """``name`` in a folder or a hub id's snapshot (from the cache; ``online`` also downloads it), else None."""
    path = Path(source).expanduser() / name
    if path.is_file():
        return path
    if Path(source).expanduser().is_dir():
        return None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(source, name, local_files_only=not online))
    except Exception:
        return None


def _index(source: str, online: bool = False) -> dict[str, Any]:
    """The ``model_index.json`` of a folder or a hub id ({} when there is none)."""
    path = _model_file(source, "model_index.json", online)
    return json.loads(path.read_text(encoding="utf-8")) if path else {}


def pipeline_class(source: str):
    """``Flux2Pipeline`` (dev) or ``Flux2KleinPipeline`` (klein, and what a source without an index is taken for)."""
    import diffusers

    name = _index(source, online=True).get("_class_name", "Flux2KleinPipeline")
    return getattr(diffusers, name if name in ("Flux2Pipeline", "Flux2KleinPipeline") else "Flux2KleinPipeline")


def render_settings(index: dict[str, Any], entry_steps: int, entry_cfg: float) -> dict[str, float]:
    if index.get("is_distilled"):
        return dict(DISTILLED_RENDER)
    return {"steps": entry_steps, "cfg": entry_cfg}


def model_render_defaults(base_model: str, family: str = "flux2") -> dict[str, float]:
    """``{"steps", "cfg"}`` for a model's files (the registry's ``render_defaults`` hook for flux2)."""
    entry = get_family(family)
    path = Path(base_model).expanduser()
    source = _source(base_model) if not path.is_file() else DEFAULT_CONFIG
    return render_settings(_index(source), entry.sample_steps, entry.guidance_scale)


# (double blocks, single blocks) of the transformer -> the variant's name; klein 4B (5, 20) is the family's ""
VARIANT_BLOCKS = {(8, 48): "dev", (8, 24): "klein9b"}
VARIANT_PATTERNS = ((re.compile(r"flux\.?2[-_. ]?dev", re.I), "dev"),
                    (re.compile(r"klein[-_. ]?(base[-_. ]?)?9b", re.I), "klein9b"))  # an uncached hub id's name


def model_variant(base_model: str, family: str = "flux2") -> str:
    """"dev", "klein9b" or "" (klein 4B, and what cannot be told): the registry's ``variant`` hook, which picks the
    memory figures and presets. A diffusers folder or cached hub id by its pipeline class (dev is ``Flux2Pipeline``)
    or its transformer's block counts, a single file by its blocks, an uncached hub id by its name."""
    path = Path(base_model).expanduser()
    if path.is_file():
        return VARIANT_BLOCKS.get(_file_block_counts(path), "")
    source = _source(base_model)
    if _index(source).get("_class_name") == "Flux2Pipeline":
        return "dev"
    found = read_transformer_config(source)
    if found:
        return VARIANT_BLOCKS.get((found.get("num_layers"), found.get("num_single_layers")), "")
    return next((name for pattern, name in VARIANT_PATTERNS if pattern.search(base_model)), "")


def _file_block_counts(path: Path) -> tuple[int, int]:
    """(double blocks, single blocks) of a single-file transformer (BFL's or diffusers' names), from its header."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
    except Exception:
        return (0, 0)
    found = {kind: {m.group(1) for m in (re.search(rf"(?:^|\.){kind}\.(\d+)\.", k) for k in keys) if m}
             for kind in ("double_blocks", "single_blocks", "transformer_blocks", "single_transformer_blocks")}
    return (len(found["double_blocks"] or found["transformer_blocks"]),
            len(found["single_blocks"] or found["single_transformer_blocks"]))


def config_source(single_file_config: str | None) -> str:
    return _source(single_file_config) if single_file_config else DEFAULT_CONFIG


NEEDS_TORCHVISION = ("FLUX.2 dev's tokenizer is a PixtralProcessor, which needs torchvision, and its folder has no "
                     "chat template that renders the pipeline's messages with the tokenizer alone: install the "
                     "torchvision built for your torch.")


def _without_processor(source: str) -> bool:
    """A dev pipeline whose ``PixtralProcessor`` transformers cannot build here (no torchvision)."""
    from transformers.utils import is_torchvision_available

    return (_index(source, online=True).get("tokenizer", [None, None])[1] == "PixtralProcessor"
            and not is_torchvision_available())


def processor_tokenizer(source: str):
    """The tokenizer of dev's ``PixtralProcessor`` with the processor's chat template (which renders the
    pipeline's message lists)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer", local_files_only=_local_only(source))
    legacy = _model_file(source, "tokenizer/chat_template.json", online=True)
    if legacy:
        tokenizer.chat_template = json.loads(legacy.read_text(encoding="utf-8"))["chat_template"]
    if not tokenizer.chat_template or not _renders_pipeline_messages(tokenizer):
        raise ModelLoadError(NEEDS_TORCHVISION)
    return tokenizer


def _renders_pipeline_messages(tokenizer) -> bool:
    """Whether the template renders the pipeline's messages (system and caption as lists of text blocks) as text:
    Mistral's text-only template would print the lists themselves."""
    from diffusers.pipelines.flux2.pipeline_flux2 import SYSTEM_MESSAGE, format_input

    try:
        text = tokenizer.apply_chat_template(format_input(["a probe caption"])[0], tokenize=False)
    except Exception:
        return False
    return SYSTEM_MESSAGE in text and "a probe caption" in text and "'type'" not in text


SINGLE_FILE_HINT = ("A single-file checkpoint holds the transformer only: its VAE, text encoder and configs come "
                    "from the hub the first time, or set single_file_config to a diffusers folder of the same model.")


def load_flux2_pipeline(base_model: str, family: str = "flux2", *, torch_dtype=None,
                        single_file_config: str | None = None, transformer=None, without_transformer: bool = False,
                        report: Callable[[str], None] | None = None):
    """A ``Flux2KleinPipeline`` / ``Flux2Pipeline``; ``transformer`` replaces the model's own (already loaded);
    ``without_transformer`` leaves it out (the trainer loads it after caching, quantized as asked)."""
    own_tokenizer = False

    def components(source: str) -> dict[str, Any]:  # diffusers refuses a tokenizer passed for the processor
        nonlocal own_tokenizer
        own_tokenizer = _without_processor(source)
        return {"tokenizer": None} if own_tokenizer else {}

    pipe = load_pipeline_files(
        pipeline_class, base_model, family, file_config=lambda: config_source(single_file_config),
        load_transformer=lambda: load_flux2_transformer(base_model, family, torch_dtype=torch_dtype,
                                                        single_file_config=single_file_config),
        torch_dtype=torch_dtype, transformer=transformer, without_transformer=without_transformer, report=report,
        single_file_hint="" if single_file_config else SINGLE_FILE_HINT, components=components)
    if own_tokenizer:
        source = config_source(single_file_config) if Path(base_model).expanduser().is_file() else _source(base_model)
        pipe.register_modules(tokenizer=processor_tokenizer(source))
    return pipe


def load_flux2_transformer(base_model: str, family: str = "flux2", *, torch_dtype=None,
                           single_file_config: str | None = None, quantization_config=None, device_map=None):
    """The ``Flux2Transformer2DModel`` alone (folder, hub id or single file), optionally quantized while loading."""
    from diffusers import Flux2Transformer2DModel

    return load_transformer_files(
        Flux2Transformer2DModel, base_model, family, torch_dtype=torch_dtype, quantization_config=quantization_config,
        device_map=device_map, file_config=lambda: config_source(single_file_config),
        single_file_hint="" if single_file_config else SINGLE_FILE_HINT)
