"""Command line: ``python -m lora_studio <command>``.

    train     --config FILE [--preset NAME] [--resume RUN_DIR] [key=value ...]
    caption   --input DIR --output CSV [--model ID_OR_PATH] [--trigger WORD] [--style-tags] [--overwrite]
    dataset   check DIR
    generate  --base MODEL --lora FILE --prompt TEXT [--strengths 0,0.5,1] [--out grid.png]
    presets   list the hardware presets and the one that fits this GPU
    miniature FAMILY --out DIR   write a miniature model trained by the project (sd15, sd15_v, sdxl, llm, blip, flux)
    doctor    check torch, CUDA, GPU memory, bitsandbytes, diffusers, and train a few steps on a tiny model

Runs the same engine as the app. Under ``accelerate launch`` the train command runs on several GPUs.
"""

from __future__ import annotations

import argparse
import sys

from .errors import StudioError
from .logging_setup import setup_logging


def build_parser() -> argparse.ArgumentParser:
    """Every command's arguments. The command modules import their heavy libraries only when they run."""
    from .cli_dataset import add_caption_parser, add_dataset_parser
    from .cli_generate import add_generate_parser
    from .cli_miniature import add_miniature_parser
    from .cli_train import add_doctor_parser, add_presets_parser, add_train_parser

    parser = argparse.ArgumentParser(prog="python -m lora_studio", description="LoRA Studio command line.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_train_parser, add_caption_parser, add_dataset_parser, add_generate_parser, add_miniature_parser,
                add_presets_parser, add_doctor_parser):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        if args.command != "doctor":  # doctor reports a broken install itself, among its other checks
            from .versions import require_working_install

            require_working_install()
        return int(args.func(args) or 0)
    except StudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
