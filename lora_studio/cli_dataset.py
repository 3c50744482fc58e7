"""Command line for datasets and captions: ``caption`` (in ``cli_caption``) and ``dataset check|prepare|convert``.

``add_caption_parser(subparsers)`` and ``add_dataset_parser(subparsers)`` register the subcommands on the
main ``python -m lora_studio`` parser; each sets ``func(args) -> exit code``. Progress goes to stderr
(tqdm), the summary to stdout. The exit code is non-zero only when nothing usable was found (or a model
or folder could not be loaded at all). ``python -m lora_studio.cli_dataset ...`` runs them on their own.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable

from lora_studio.errors import StudioError

log = logging.getLogger(__name__)

EXIT_OK, EXIT_NOTHING_USABLE, EXIT_ERROR = 0, 1, 2


def _progress_bar(desc: str) -> tuple[Callable, Callable[[], None]]:
    """A ``progress(done, total, path)`` callback drawing a tqdm bar on stderr, and a close function."""
    from tqdm import tqdm

    state: dict = {"bar": None}

    def update(done: int, total: int, _path=None) -> None:
        bar = state["bar"]
        if bar is None or bar.total != total:
            if bar is not None:
                bar.close()
            bar = state["bar"] = tqdm(total=total, desc=desc, unit="img", file=sys.stderr, leave=False)
        bar.n = done
        bar.refresh()

    def close() -> None:
        if state["bar"] is not None:
            state["bar"].close()

    return update, close


def _fail(exc: StudioError) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return EXIT_ERROR


# ---------------------------------------------------------------------------------------------- caption
def add_caption_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``caption`` (its options and command live in ``cli_caption``)."""
    from lora_studio.cli_caption import add_caption_parser as add

    return add(subparsers)


# ---------------------------------------------------------------------------------------------- dataset
def _print_table(rows: list[list[str]], headers: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    widths = [min(w, 60) for w in widths]
    for row in [headers, *rows]:
        print("  ".join(str(cell)[:60].ljust(w) for cell, w in zip(row, widths)).rstrip())


def cmd_dataset_check(args: argparse.Namespace) -> int:
    """``dataset check DIR``: report problems per file (captions too long for the family included) and a summary."""
    from lora_studio.captioning.style import target_family
    from lora_studio.captioning.token_limits import flag_long_captions, limit_text
    from lora_studio.data.scan import ROW_HEADERS, scan_folder

    progress, close = _progress_bar("checking")
    try:
        report = scan_folder(args.folder, min_size=args.min_size, max_aspect=args.max_aspect, progress=progress)
    except StudioError as exc:
        return _fail(exc)
    finally:
        close()
    family = target_family(args.family, args.base_model) or "sd15"
    too_long = flag_long_captions(report, family, args.base_model)
    rows = report.rows(problems_only=not args.all)
    if rows:
        _print_table(rows, ROW_HEADERS)
        print()
    print(report.summary())
    for note in report.notes():
        print(f"  {note}")
    if too_long:
        print(f"  {len(too_long)} caption(s) are longer than {limit_text(family)}: the end of each is cut in "
              "training (shorten them, or pick the family you will train with --family).")
    if args.json:
        from lora_studio.fileio import atomic_write_json

        atomic_write_json(args.json, report.to_dict())
        print(f"report written to {args.json}")
    return EXIT_OK if report.usable else EXIT_NOTHING_USABLE


def cmd_dataset_prepare(args: argparse.Namespace) -> int:
    """``dataset prepare DIR --output OUT``: resized copies + captions; the source is never modified."""
    from lora_studio.data.prepare import prepare_dataset
    from lora_studio.data.scan import scan_folder

    progress, close = _progress_bar("preparing")
    try:
        report = scan_folder(args.folder, min_size=args.min_size, max_aspect=args.max_aspect)
        if not report.usable:
            print(report.summary())
            return EXIT_NOTHING_USABLE
        result = prepare_dataset(report, args.output, resolution=args.resolution, mode=args.mode,
                                 captions=args.captions, progress=progress)
    except StudioError as exc:
        return _fail(exc)
    finally:
        close()
    print(report.summary())
    print(result.summary())
    return EXIT_OK if result.written else EXIT_NOTHING_USABLE


def cmd_dataset_convert(args: argparse.Namespace) -> int:
    """``dataset convert DIR --to txt|csv``: copy captions between metadata.csv and .txt sidecars."""
    from lora_studio.data.captions import METADATA_NAME, csv_to_txt, txt_to_csv
    from lora_studio.data.images import list_images

    folder = Path(args.folder)
    csv_path = Path(args.csv) if args.csv else folder / METADATA_NAME
    try:
        images = list_images(folder)
        if not images:
            print(f"No images found in '{folder}'.", file=sys.stderr)
            return EXIT_NOTHING_USABLE
        if args.to == "txt":
            written = csv_to_txt(csv_path, folder, images, overwrite=args.overwrite)
            print(f"{len(written)} caption file(s) written from {csv_path}")
        else:
            path = txt_to_csv(folder, images, csv_path, overwrite=args.overwrite)
            print(f"captions written to {path}")
    except StudioError as exc:
        return _fail(exc)
    return EXIT_OK


def add_dataset_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``dataset`` (with ``check``, ``prepare``, ``convert``) on ``subparsers``."""
    from lora_studio.captioning.token_limits import FAMILY_LIMITS
    from lora_studio.data.prepare import CAPTION_FORMATS, MODES
    from lora_studio.data.scan import DEFAULT_MAX_ASPECT, DEFAULT_MIN_SIZE

    p = subparsers.add_parser("dataset", help="check, prepare or convert a folder of training images")
    sub = p.add_subparsers(dest="dataset_command", metavar="{check,prepare,convert}")
    sub.required = True

    def limits(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--min-size", type=int, default=DEFAULT_MIN_SIZE,
                        help=f"skip images whose short side is under N px (default {DEFAULT_MIN_SIZE})")
        sp.add_argument("--max-aspect", type=float, default=DEFAULT_MAX_ASPECT,
                        help=f"skip images longer than this ratio, e.g. 4 for 4:1 (default {DEFAULT_MAX_ASPECT:g})")

    check = sub.add_parser("check", help="report unreadable, tiny, duplicate, uncaptioned... images")
    check.add_argument("folder", help="folder of training images")
    limits(check)
    check.add_argument("--all", action="store_true", help="list every file, not only those with a problem")
    check.add_argument("--json", default=None, help="also write the full report to this JSON file")
    check.add_argument("--family", choices=list(FAMILY_LIMITS), default=None,
                       help="the family you will train, for the caption length check (default: of --base-model, "
                            "else sd15)")
    check.add_argument("--base-model", default=None, help="the base model you will train (exact token counts)")
    check.set_defaults(func=cmd_dataset_check)

    prep = sub.add_parser("prepare", help="write resized RGB copies and captions to a working folder")
    prep.add_argument("folder", help="folder of training images (never modified)")
    prep.add_argument("--output", required=True, help="working folder for the copies (outside the source)")
    prep.add_argument("--resolution", type=int, default=512, help="target size in px (default 512)")
    prep.add_argument("--mode", choices=MODES, default="center_crop", help="how to resize (default center_crop)")
    prep.add_argument("--captions", choices=CAPTION_FORMATS, default="both", help="caption files to write")
    limits(prep)
    prep.set_defaults(func=cmd_dataset_prepare)

    conv = sub.add_parser("convert", help="convert captions between metadata.csv and .txt sidecars")
    conv.add_argument("folder", help="folder of training images")
    conv.add_argument("--to", choices=("txt", "csv"), required=True, help="target format")
    conv.add_argument("--csv", default=None, help="the metadata.csv (default: <folder>/metadata.csv)")
    conv.add_argument("--overwrite", action="store_true", help="replace captions already in the target")
    conv.set_defaults(func=cmd_dataset_convert)
    return p


def build_parser() -> argparse.ArgumentParser:
    """A parser with just these two commands (the main one lives in ``lora_studio.__main__``)."""
    parser = argparse.ArgumentParser(prog="python -m lora_studio.cli_dataset")
    subparsers = parser.add_subparsers(dest="command", metavar="{caption,dataset}")
    subparsers.required = True
    add_caption_parser(subparsers)
    add_dataset_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
