"""The ``miniature`` command: write one of the miniature models trained by the project as a model folder.

    python -m lora_studio miniature sd15 --out models/miniature-sd15

The folder loads offline with ``StableDiffusionPipeline.from_pretrained`` (``sd15``, ``sd15_v``),
``StableDiffusionXLPipeline`` (``sdxl``), ``FluxPipeline`` (``flux``), ``ZImagePipeline`` (``z_image``),
``StableDiffusion3Pipeline`` (``sd3``), ``Flux2KleinPipeline`` (``flux2``), ``QwenImagePipeline`` (``qwen_image``),
``AutoModelForCausalLM`` (``llm``) or
``BlipForConditionalGeneration`` (``blip``), and works as a base model or captioner everywhere in the studio.
"""

from __future__ import annotations

import argparse

from .miniature.store import FAMILIES, write_miniature


def add_miniature_parser(sub) -> None:
    p = sub.add_parser("miniature", help="write a miniature model (trained by the project on a tiny world) to a folder",
                       description="Write a miniature model as a folder that from_pretrained loads offline. "
                                   + " ".join(f"{name}: {what}." for name, what in FAMILIES.items()))
    p.add_argument("family", choices=list(FAMILIES))
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--force", action="store_true", help="replace the folder if it exists")
    p.set_defaults(func=cmd_miniature)


def cmd_miniature(args: argparse.Namespace) -> int:
    out = write_miniature(args.family, args.out, overwrite=args.force)
    print(f"Wrote the {args.family} miniature ({FAMILIES[args.family]}) to {out}")
    return 0
