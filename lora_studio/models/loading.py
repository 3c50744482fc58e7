"""Load an image model's pipeline: a local diffusers folder, a hub id, or one A1111/ComfyUI-style checkpoint file.

The pipeline class comes from the family registry (``families.py``); which family a model is, is told by
``detect.py``. Every failure becomes one ``ModelLoadError`` sentence that says what to do.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

from ..errors import ModelLoadError
from ..families import get_family
from .detect import family_name, first_line, is_local

log = logging.getLogger(__name__)


def load_diffusion_pipeline(base_model: str, family: str, *, torch_dtype=None, vae: str | None = None,
                            report: Callable[[str], None] | None = None, single_file_config: str | None = None):
    """Load the family's pipeline (``Family.pipeline``: StableDiffusionPipeline, FluxPipeline ...) from a folder,
    hub id or single file.

    ``report`` hears how a hub download of the model or the VAE is going (``models.download``). A single
    file takes its configs and tokenizer from ``single_file_config`` (a diffusers folder or hub id of the
    same family), else diffusers fetches the family's standard ones from the hub (once, then cached)."""
    from .download import download_progress
    from .load_lock import model_loading

    loader = get_family(family).hook("pipeline_loader")
    with model_loading(base_model):
        if loader is not None:  # a family that loads its pipeline itself (FLUX.1/Chroma: models/flux_loading.py)
            pipe = loader(base_model, family, torch_dtype=torch_dtype, single_file_config=single_file_config,
                          report=report)
        else:
            with download_progress(base_model, report):
                pipe = _load_pipeline(base_model, family, torch_dtype, single_file_config)
        if vae:
            with download_progress(vae, report):
                pipe.vae = load_vae(vae, torch_dtype)
    return pipe


def _load_pipeline(base_model: str, family: str, torch_dtype, single_file_config: str | None = None):
    import inspect

    cls = get_family(family).pipeline_class()
    kwargs: dict[str, Any] = {}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if "requires_safety_checker" in inspect.signature(cls.__init__).parameters:  # SD1.x/2.x: no safety checker
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    path = Path(base_model).expanduser()
    try:
        if path.is_file():
            if single_file_config:
                kwargs["config"] = str(Path(single_file_config).expanduser()) if is_local(single_file_config) \
                    else single_file_config
            pipe = cls.from_single_file(str(path), **kwargs)
        else:
            local_only = os.environ.get("HF_HUB_OFFLINE") == "1" and not path.is_dir()
            pipe = cls.from_pretrained(str(path) if path.is_dir() else base_model, local_files_only=local_only,
                                       **kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:
        hint = "Check that it is complete and of that family."
        if path.is_file() and not single_file_config:
            hint = (f"{hint} A single-file checkpoint takes its configs and tokenizer from the hub the first time "
                    "(a few MB): connect once, or set single_file_config to a diffusers folder of the same family.")
        raise ModelLoadError(f"Could not load the {family_name(family)} model '{base_model}': "
                             f"{first_line(exc)}. {hint}") from None
    return pipe


def load_vae(vae: str, torch_dtype=None):
    from diffusers import AutoencoderKL

    from .load_lock import model_loading

    path = Path(vae).expanduser()
    kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
    try:
        with model_loading(vae):
            if path.is_file():
                return AutoencoderKL.from_single_file(str(path), **kwargs)
            if path.is_dir() and not (path / "config.json").exists() and (path / "vae").is_dir():
                path = path / "vae"
            return AutoencoderKL.from_pretrained(str(path) if path.exists() else vae, **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"Could not load the VAE '{vae}': {first_line(exc)}.") from None
