"""Build a miniature model from scratch: ``python -m lora_studio.miniature.build FAMILY --out DIR``.

    python -m lora_studio.miniature.build sd15   --out lora_studio/miniature/weights/sd15
    python -m lora_studio.miniature.build sd15_v --out lora_studio/miniature/weights/sd15_v   (uses sd15)
    python -m lora_studio.miniature.build sdxl   --out lora_studio/miniature/weights/sdxl     (uses sd15)
    python -m lora_studio.miniature.build llm    --out lora_studio/miniature/weights/llm
    python -m lora_studio.miniature.build blip   --out lora_studio/miniature/weights/blip
    python -m lora_studio.miniature.build flux   --out lora_studio/miniature/weights/flux     (uses sd15's VAE)
    python -m lora_studio.miniature.build z_image --out lora_studio/miniature/weights/z_image (uses flux's VAE)
    python -m lora_studio.miniature.build sd3    --out lora_studio/miniature/weights/sd3      (uses flux's VAE)
    python -m lora_studio.miniature.build flux2  --out lora_studio/miniature/weights/flux2    (uses sd15's VAE)
    python -m lora_studio.miniature.build qwen_image --out lora_studio/miniature/weights/qwen_image (its own VAE)

Deterministic: the recipe's seed, the same torch version and ``--threads`` give the same weights. The
folder gets ``build.json``: the recipe, the versions, the time taken and what the build measured.
``--scale 0.01`` runs every stage with 1 % of the steps (the test suite's check that the script runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from ..fileio import atomic_write_json

log = logging.getLogger("lora_studio.miniature.build")
FAMILIES = ("sd15", "sd15_v", "sdxl", "llm", "blip", "flux", "z_image", "sd3", "flux2", "qwen_image")
# The miniature a family starts from (its VAE, or more), unless ``--base`` names another folder
BASES = {"sd15_v": "sd15", "sdxl": "sd15", "flux": "sd15", "z_image": "flux", "sd3": "flux", "flux2": "sd15"}
# The flow-matching families: each one's recipe class in its module build_<family>.py
FLOW_BUILDERS = {"flux": "FluxRecipe", "z_image": "ZImageRecipe", "sd3": "SD3Recipe", "flux2": "Flux2Recipe",
                 "qwen_image": "QwenImageRecipe"}
WEIGHTS = Path(__file__).resolve().parent / "weights"


def build(family: str, out: str | Path, scale: float = 1.0, base: str | Path | None = None,
          threads: int = 2) -> dict:
    """Build ``family`` into the folder ``out`` (replaced at the end, if it exists); returns the ``build.json``
    record. The build writes into a sibling temporary folder, so ``out`` is never half written."""
    if family not in FAMILIES:
        raise ValueError(f"unknown miniature '{family}': choose one of {', '.join(FAMILIES)}")
    final = Path(out)
    out = final.with_name(f".{final.name}.building")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    started, cpu_started = time.time(), time.process_time()
    try:
        recipe, report = _run(family, out, scale, Path(base) if base else WEIGHTS / BASES.get(family, "sd15"))
    finally:
        torch.set_num_threads(previous_threads)
    record = {"family": family, "recipe": dataclasses.asdict(recipe), "scale": scale, "threads": threads,
              "seconds": round(time.time() - started, 1), "cpu_seconds": round(time.process_time() - cpu_started, 1),
              "measured": report, "versions": _versions(),
              "command": f"python -m lora_studio.miniature.build {family} --out DIR" + (
                  f" --scale {scale}" if scale != 1.0 else "")}
    atomic_write_json(out / "build.json", record)
    if final.exists():
        shutil.rmtree(final)
    out.rename(final)
    log.info("built %s in %.0fs: %s", family, record["seconds"], report)
    return record


def _run(family: str, out: Path, scale: float, base: Path):
    if family in ("sd15", "sd15_v", "sdxl"):
        from . import build_sd

        recipe = build_sd.SDRecipe().scaled(scale)
        if family == "sd15":
            return recipe, build_sd.build_sd15(out, recipe, log.info)
        builder = build_sd.build_sd15_v if family == "sd15_v" else build_sd.build_sdxl
        return recipe, builder(out, recipe, log.info, base=base)
    if family in FLOW_BUILDERS:  # build_<family>.py with its recipe class and build_<family>(out, recipe, log, base)
        module = importlib.import_module(f"{__package__}.build_{family}")
        recipe = getattr(module, FLOW_BUILDERS[family])().scaled(scale)
        return recipe, getattr(module, f"build_{family}")(out, recipe, log.info, base=base)
    if family == "llm":
        from . import build_llm

        recipe = build_llm.LLMRecipe().scaled(scale)
        return recipe, build_llm.build_llm(out, recipe, log.info)
    from . import build_blip

    recipe = build_blip.BlipRecipe().scaled(scale)
    return recipe, build_blip.build_blip(out, recipe, log.info)


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lora_studio.miniature.build", description=__doc__.splitlines()[0])
    p.add_argument("family", choices=FAMILIES)
    p.add_argument("--out", required=True, help="the folder to write (replaced if it exists)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every step count (0.01: a quick check)")
    p.add_argument("--base", default=None, help="the miniature to start from: sd15 for sd15_v, sdxl, flux and "
                                                "flux2, flux for z_image and sd3 (default: the committed one; "
                                                "qwen_image starts from nothing)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (the committed weights used 2)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    build(args.family, args.out, args.scale, args.base, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
