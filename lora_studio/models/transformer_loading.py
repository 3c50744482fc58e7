"""What the SD3.5, FLUX.2, Qwen-Image and Z-Image loaders share: the transformer alone from a folder, a hub id or one single file
(optionally quantized while loading), and the one-sentence error of a failed load.

    load_transformer_files(SD3Transformer2DModel, path, "sd3", file_config=lambda: source, torch_dtype=bf16)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from ..errors import ModelLoadError
from ..families import get_family
from .detect import first_line
from .flux_loading import _local_only
from .load_lock import model_loading


def read_transformer_config(base_model: str) -> dict[str, Any]:
    """The transformer's config.json of a diffusers folder or a cached hub id ({} when neither has one; nothing is
    downloaded)."""
    path = Path(base_model).expanduser()
    config = path / "transformer" / "config.json"
    if not config.is_file():
        if path.exists():
            return {}
        try:
            from huggingface_hub import hf_hub_download

            config = Path(hf_hub_download(base_model, "transformer/config.json", local_files_only=True))
        except Exception:
            return {}
    return json.loads(config.read_text(encoding="utf-8"))


def load_failure(base_model: str, family: str, exc: Exception, hint: str = "") -> ModelLoadError:
    """``Could not load the <family> model '<x>': <first line>. Check ...`` (``hint``: what a single file needs)."""
    return ModelLoadError(f"Could not load the {get_family(family).name} model '{base_model}': {first_line(exc)}. "
                          f"Check that it is complete and of that family.{' ' + hint if hint else ''}")


def load_transformer_files(cls, base_model: str, family: str, *, file_config: Callable[[], str],
                           torch_dtype=None, quantization_config=None, device_map=None, single_file_hint: str = ""):
    """``cls`` (a diffusers transformer class) from ``base_model``; a single file takes its config from
    ``file_config()`` (a diffusers folder or hub id of the same model)."""
    path = Path(base_model).expanduser()
    kwargs: dict[str, Any] = {"dtype": torch_dtype} if torch_dtype is not None else {}
    try:
        with model_loading(base_model):
            if path.is_file():
                source = file_config()
                return cls.from_single_file(str(path), config=source, subfolder="transformer",
                                            local_files_only=_local_only(source), **kwargs)
            if quantization_config is not None:
                kwargs["quantization_config"] = quantization_config
            if device_map is not None:
                kwargs["device_map"] = device_map
            source = str(path) if path.is_dir() else base_model
            return cls.from_pretrained(source, subfolder="transformer", local_files_only=_local_only(source), **kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise load_failure(base_model, family, exc, single_file_hint if path.is_file() else "") from None


def load_pipeline_files(pipeline_for: Callable[[str], Any], base_model: str, family: str, *,
                        file_config: Callable[[], str], load_transformer: Callable[[], Any], torch_dtype=None,
                        transformer=None, without_transformer: bool = False, report: Callable[[str], None] | None = None,
                        single_file_hint: str = "", components: Callable[[str], dict[str, Any]] | None = None):
    """The pipeline (``pipeline_for(source)``: its class) of a folder or hub id, or of a single transformer file
    (``load_transformer()``) with everything else from ``file_config()``; ``transformer`` replaces the model's own,
    ``without_transformer`` leaves it out (the trainer loads it after caching, quantized as asked); ``components(source)``
    gives more ``from_pretrained`` arguments for that source (FLUX.2 dev leaves out a tokenizer it cannot build)."""
    from .download import download_progress

    path = Path(base_model).expanduser()
    kwargs: dict[str, Any] = {"dtype": torch_dtype} if torch_dtype is not None else {}
    if transformer is not None or without_transformer:
        kwargs["transformer"] = transformer
    try:
        with model_loading(base_model), download_progress(base_model, report):
            if path.is_file():
                source = file_config()
                if "transformer" not in kwargs:
                    kwargs["transformer"] = load_transformer()
            else:
                source = str(path) if path.is_dir() else base_model
            kwargs.update(components(source) if components else {})
            return pipeline_for(source).from_pretrained(source, local_files_only=_local_only(source), **kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise load_failure(base_model, family, exc, single_file_hint if path.is_file() else "") from None
