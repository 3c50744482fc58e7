"""Kohya/A1111 metadata for a LoRA file: the ``ss_*`` training keys, ``modelspec.*`` and the model hashes.

A1111/Forge show the ``ss_*`` keys in the LoRA card (tags from ``ss_tag_frequency``, the base model, the
resolution) and identify the file by ``sshs_model_hash``: the sha256 of every byte after the safetensors
header (``hashes.addnet_hash_safetensors`` in A1111, ``train_util.precalculate_safetensors_hashes`` in
kohya's sd-scripts). Those bytes depend only on the tensors, so user metadata can change without
changing the hash. ``sshs_legacy_hash`` is kohya's older short hash (8 hex digits of the sha256 of the
64 KiB at offset 1 MiB of a serialization that carries only the ``ss_*`` metadata).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from ..families import FAMILIES

# ss_base_model_version per family: the registry's kohya_version (sd_v1, sdxl_base_v1-0, flux1, chroma ...)
BASE_MODEL_VERSION = {f.id: f.kohya_version for f in FAMILIES.values() if f.kohya_version}
_ARCHITECTURE = {"sd15": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base",
                 "flux": "flux-1-dev", "chroma": "chroma",
                 "sd3": "stable-diffusion-v3-5-large", "flux2": "flux-2-klein"}
# kohya's sai_model_spec: an SDXL LoRA names the SAI implementation, SD1.x/SD2.x LoRAs name diffusers
_IMPLEMENTATION = {"sdxl": "https://github.com/Stability-AI/generative-models",
                   "flux": "https://github.com/black-forest-labs/flux",
                   "chroma": "https://huggingface.co/lodestones/Chroma",
                   "sd3": "https://github.com/Stability-AI/sd3.5", "flux2": "https://github.com/black-forest-labs/flux2"}
_BLOCK = 1024 * 1024


def build_kohya_metadata(*, output_name: str, family: str, rank: int, alpha: float | Mapping[str, float],
                         resolution: int | tuple[int, int], num_train_images: int,
                         tag_frequency: Mapping[str, Mapping[str, int]], base_model_name: str,
                         training_started_at: float, steps: int, epoch: int,
                         extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The ``ss_*`` and ``modelspec.*`` metadata kohya's sd-scripts writes, every value a string.

    ``alpha`` may be per module (a dict); ``ss_network_alpha`` then holds the most common value, as
    there is one field. ``extra`` adds or overrides keys (dicts and lists become JSON), e.g.
    ``{"ss_v_parameterization": True}`` for a v-prediction SD2 model.
    """
    if family not in BASE_MODEL_VERSION:
        raise ValueError(f"family must be one of {', '.join(BASE_MODEL_VERSION)}, not {family!r}")
    if isinstance(alpha, Mapping):
        values = [float(v) for v in alpha.values()] or [float(rank)]
        alpha = max(set(values), key=values.count)
    width, height = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    finished = time.time()
    meta: dict[str, Any] = {
        "ss_output_name": output_name,
        "ss_base_model_version": BASE_MODEL_VERSION[family],
        "ss_v2": family == "sd2",
        "ss_network_module": "networks.lora",
        "ss_network_dim": int(rank),
        "ss_network_alpha": float(alpha),  # kohya writes str(float): "8.0"
        "ss_resolution": f"({width}, {height})",
        "ss_num_train_images": int(num_train_images),
        "ss_tag_frequency": json.dumps(dict(tag_frequency), ensure_ascii=False),
        "ss_sd_model_name": base_model_name,
        "ss_training_started_at": training_started_at,
        "ss_training_finished_at": finished,
        "ss_steps": int(steps),
        "ss_epoch": int(epoch),
        "ss_training_comment": "trained with LoRA Studio",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{_ARCHITECTURE.get(family, family.replace('_', '-'))}/lora",
        "modelspec.implementation": _IMPLEMENTATION.get(family, "diffusers"),
        "modelspec.title": output_name,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": datetime.fromtimestamp(finished, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
    }
    meta.update(extra or {})
    return {k: _as_text(v) for k, v in meta.items()}


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _open(path_or_bytes: str | os.PathLike | bytes) -> Any:
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return io.BytesIO(path_or_bytes)
    return open(path_or_bytes, "rb")


def model_hash(path_or_bytes: str | os.PathLike | bytes) -> str:
    """``sshs_model_hash``: sha256 (hex) of the bytes after the safetensors header, as A1111 computes it."""
    sha = hashlib.sha256()
    with _open(path_or_bytes) as fh:
        header = fh.read(8)
        if len(header) < 8:
            raise ValueError("not a safetensors file (shorter than its 8-byte header length)")
        fh.seek(8 + int.from_bytes(header, "little"))
        for chunk in iter(lambda: fh.read(_BLOCK), b""):
            sha.update(chunk)
    return sha.hexdigest()


def legacy_hash(path_or_bytes: str | os.PathLike | bytes) -> str:
    """Kohya's ``addnet_hash_legacy``: first 8 hex digits of the sha256 of the 64 KiB at offset 1 MiB."""
    with _open(path_or_bytes) as fh:
        fh.seek(0x100000)
        return hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]


def kohya_hashes(tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` as kohya precalculates them (serialized with the ss_* keys only)."""
    from safetensors.torch import save

    data = save(dict(tensors), metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    return model_hash(data), legacy_hash(data)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata (``__metadata__``) of a safetensors file, ``{}`` when it has none."""
    from safetensors import safe_open

    with safe_open(str(Path(path)), framework="pt") as fh:
        return dict(fh.metadata() or {})
