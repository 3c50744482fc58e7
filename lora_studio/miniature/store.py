"""The committed miniature weights, and writing one as a folder ``from_pretrained`` loads offline.

    write_miniature("sd15", "models/miniature-sd15")   # diffusers StableDiffusionPipeline folder
    write_miniature("llm", "models/miniature-llm")     # transformers AutoModelForCausalLM + tokenizer folder

Each family's folder in ``weights/`` was written by ``python -m lora_studio.miniature.build FAMILY`` and holds
its ``build.json`` (recipe, seed, versions, time, what the build measured).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import StudioError

WEIGHTS = Path(__file__).resolve().parent / "weights"
FAMILIES: dict[str, str] = {
    "sd15": "SD1.x-shaped diffusers pipeline (epsilon prediction, DDPM scheduler)",
    "sd15_v": "SD1.x-shaped diffusers pipeline with v-prediction",
    "sdxl": "SDXL-shaped diffusers pipeline (two text encoders, size and crop conditioning)",
    "llm": "Llama-shaped causal language model with its tokenizer and chat template",
    "blip": "BLIP captioning model with its processor",
    "flux": "FLUX.1-shaped diffusers pipeline (flow matching, CLIP and T5 text encoders, 16-channel VAE)",
    "z_image": "Z-Image-shaped diffusers pipeline (flow matching, Qwen3 text encoder, FLUX's 16-channel VAE)",
    "sd3": "SD3.5-Medium-shaped diffusers pipeline (flow matching, CLIP-L, CLIP-G and T5, FLUX's 16-channel VAE)",
    "flux2": "FLUX.2-klein-shaped diffusers pipeline (flow matching, Qwen3 text encoder, 32-channel batch-norm VAE)",
    "qwen_image": "Qwen-Image-shaped diffusers pipeline (flow matching, Qwen2.5-VL text encoder, causal 3-D VAE, true "
                  "classifier-free guidance)",
}


def miniature_dir(family: str) -> Path:
    """The committed folder of ``family`` (read it, do not write into it)."""
    if family not in FAMILIES:
        raise StudioError(f"There is no miniature '{family}'; choose one of: {', '.join(FAMILIES)}.")
    folder = WEIGHTS / family
    if not (folder / "build.json").is_file():
        raise StudioError(f"The miniature '{family}' is not built in this copy of LoRA Studio; build it with "
                          f"python -m lora_studio.miniature.build {family} --out {folder}")
    return folder


def available() -> list[str]:
    """The families whose weights are present."""
    return [f for f in FAMILIES if (WEIGHTS / f / "build.json").is_file()]


def write_miniature(family: str, out: str | Path, overwrite: bool = False) -> Path:
    """Copy the miniature of ``family`` to the folder ``out``; returns ``out``.

    A folder that exists and is not empty is refused unless ``overwrite`` (then it is replaced). The copy
    goes to a sibling temporary folder first, then is renamed, so ``out`` is never half written.
    """
    source = miniature_dir(family)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise StudioError(f"'{out}' already exists and is not empty; choose another folder or pass --force "
                              "to replace it.")
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(source, tmp)
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    tmp.rename(out)
    return out


def ensure_miniature(family: str, out: str | Path) -> Path:
    """``out`` if it already holds this miniature (the same ``build.json``), else a fresh copy there."""
    out = Path(out)
    mine = out / "build.json"
    if mine.is_file() and mine.read_bytes() == (miniature_dir(family) / "build.json").read_bytes():
        return out
    return write_miniature(family, out, overwrite=True)
