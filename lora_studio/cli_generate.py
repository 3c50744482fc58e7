"""The ``generate`` command: one prompt and seed at several LoRA strengths, saved as one labelled PNG.

    python -m lora_studio generate --base MODEL --lora my_lora.safetensors --prompt "a cat, my_style" \
        --strengths 0,0.5,1 --out grid.png

Several ``--lora`` files (e.g. checkpoints of one run) give one row each. Strength 0 is the base model. Steps and
guidance default to what the model is made for (FLUX.1-dev 28 / 3.5, schnell 4 / 0, Chroma 35 / 5, Qwen-Image
50 / true CFG 4, Z-Image-Turbo 9 / 0, SD 25 / 7).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="render a prompt at several LoRA strengths into one grid PNG",
                       description="Render the same prompt and seed at several LoRA strengths (0 = base model).")
    p.add_argument("--base", required=True, help="base model: diffusers folder, hub id or .safetensors checkpoint")
    p.add_argument("--lora", required=True, action="append", metavar="FILE",
                   help="LoRA file (kohya/A1111 or diffusers); repeat for a checkpoint-by-strength grid")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: FLUX.1-dev 28, schnell 4, Chroma 35, Qwen-Image 50, "
                        "Z-Image-Turbo 9, Stable Diffusion 25)")
    p.add_argument("--cfg", type=float, default=None,
                   help="guidance scale (default: FLUX.1-dev 3.5, schnell 0, Chroma 5, Qwen-Image 4 (true CFG), "
                        "Z-Image-Turbo 0, Stable Diffusion 7)")
    p.add_argument("--size", type=int, default=None, help="width and height in pixels (default: the model's)")
    p.add_argument("--vae", default=None, help="optional VAE folder, hub id or file")
    p.add_argument("--single-file-config", default=None, metavar="MODEL",
                   help="for a single-file --base: a diffusers folder or hub id of the same family (its configs)")
    p.add_argument("--strengths", default="0,0.25,0.5,0.75,1", help="comma-separated strengths")
    p.add_argument("--out", default="grid.png", help="output PNG (default grid.png)")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from .inference.grid import (RenderSettings, lora_display_name, model_render_defaults, parse_strengths,
                                 render_grid)

    strengths = parse_strengths(args.strengths)
    defaults = model_render_defaults(args.base) or {"steps": 25, "cfg": 7.0}
    settings = RenderSettings(prompt=args.prompt, negative=args.negative, seed=args.seed,
                              steps=args.steps if args.steps is not None else defaults["steps"],
                              cfg=args.cfg if args.cfg is not None else defaults["cfg"], width=args.size,
                              height=args.size)
    loras = [(lora_display_name(f), f) for f in args.lora]
    if len({label for label, _ in loras}) < len(loras):
        loras = [(str(Path(f)), f) for f in args.lora]

    def progress(done: int, total: int, label: str) -> None:
        sys.stderr.write(f"\r[{done}/{total}] {label}          ")
        sys.stderr.flush()

    result = render_grid(args.base, loras, settings, strengths, vae=args.vae, progress=progress, out_path=args.out,
                         single_file_config=args.single_file_config)
    sys.stderr.write("\n")
    print(f"Grid written to {result.path}")
    if result.tags:
        print("Paste into AUTOMATIC1111 / Forge: " + "  ".join(result.tags))
    return 0
