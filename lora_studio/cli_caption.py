"""Command line ``caption``: caption a folder with any captioner, in the style of the model you will train.

    python -m lora_studio caption --input imgs --model florence2 --family flux --trigger mystyle
    python -m lora_studio caption --input imgs --model wd14 --general-threshold 0.4 --exclude "simple background"
    python -m lora_studio caption --input imgs --model qwen-vl --instruction "Describe the outfit in detail."
    python -m lora_studio caption --input imgs --model joycaption --length 60 --tags wd14
    python -m lora_studio caption --input imgs --model /models/my-florence --style short

``--model`` is a captioner name (its default hub model), a hub id or a local folder; ``--tags`` adds a
tagger's tags after the sentence. The style (tags, short, detailed) comes from ``--style``, else from the
target family (``--family`` or the family of ``--base-model``), else tags for a tagger and short otherwise.
With a family, captions longer than its text encoder reads are listed. Registered on the main parser by
``cli_dataset.add_caption_parser``.
"""

from __future__ import annotations

import argparse
import sys

from lora_studio.cli_dataset import EXIT_ERROR, EXIT_NOTHING_USABLE, EXIT_OK, _fail, _progress_bar
from lora_studio.errors import StudioError


def options_from_args(args: argparse.Namespace, style: str):
    """The ``CaptionerOptions`` the command line asked for."""
    from lora_studio.captioning.choose import CaptionerOptions

    return CaptionerOptions(
        style=style, max_new_tokens=args.max_tokens, temperature=args.temperature, batch_size=args.batch_size,
        device=args.device, task=args.task, instruction=args.instruction, quantize_4bit=args.four_bit,
        max_pixels=args.max_pixels, caption_type=args.caption_type, length=args.length,
        general_threshold=args.general_threshold, character_threshold=args.character_threshold,
        exclude=[t.strip() for t in (args.exclude or "").split(",") if t.strip()],
        underscores_to_spaces=not args.keep_underscores, include_rating=args.rating, prefix=args.prefix)


def _captioners(args: argparse.Namespace, style: str) -> list:
    from lora_studio.captioning.choose import make_captioner

    options = options_from_args(args, style)
    captioners = []
    if args.model.lower() != "none":
        captioners.append(make_captioner(args.model, options))
    if args.tags:
        captioners.append(make_captioner(args.tags, options))
    if args.style_tags:
        from lora_studio.captioning.clip_tags import ClipStyleTagger

        captioners.append(ClipStyleTagger(args.clip_model, device=args.device, batch_size=args.batch_size))
    return captioners


def _report_lengths(captions: dict, family: str | None, base_model: str | None) -> None:
    from lora_studio.captioning.token_limits import check_lengths, limit_text

    if not family:
        return
    cut = {p: c for p, c in check_lengths(captions, family, base_model).items() if c.cut}
    if cut:
        print(f"{len(cut)} caption(s) are longer than {limit_text(family)}: the end of each is cut in training.")
        for path, check in cut.items():
            print(f"  too long {path.name}: {check.problem()}")


def cmd_caption(args: argparse.Namespace) -> int:
    """``caption``: caption a folder into metadata.csv (and .txt sidecars with ``--txt``)."""
    from lora_studio.captioning.batch import caption_folder
    from lora_studio.captioning.choose import detect_captioner
    from lora_studio.captioning.style import resolve_style, target_family

    family = target_family(args.family, args.base_model)
    try:
        tags_only = args.model.lower() == "none" or detect_captioner(args.model) == "wd14"
        style = resolve_style(args.style, family, args.base_model or "", tags_only=tags_only)
        captioners = _captioners(args, style)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if not captioners:
        print("error: nothing to do: --model none needs --tags or --style-tags.", file=sys.stderr)
        return EXIT_ERROR
    progress, close = _progress_bar("captioning")
    try:
        run = caption_folder(args.input, captioners, output_csv=args.output, trigger=args.trigger,
                             overwrite=args.overwrite, write_txt=args.txt, progress=progress, style=style,
                             trigger_placement=args.trigger_placement)
    except StudioError as exc:
        return _fail(exc)
    finally:
        close()
    report = run.report
    if report is not None:
        for check in report.skipped:
            print(f"skipped {check.name}: {'; '.join(check.problems)}", file=sys.stderr)
    for path, reason in run.failed.items():
        print(f"failed {path}: {reason}", file=sys.stderr)
    print(run.summary() + f" (style: {style})")
    if run.written:
        more = len(run.written) - 1
        print(f"captions written to {run.written[0]}" + (f" (+{more} more files)" if more else ""))
    _report_lengths(run.captions, family, args.base_model)
    if report is None or not report.usable:
        print(f"No usable images found in '{args.input}'.", file=sys.stderr)
        return EXIT_NOTHING_USABLE
    return EXIT_OK


def _add_model_options(p: argparse.ArgumentParser) -> None:
    from lora_studio.captioning.florence import FLORENCE_TASKS
    from lora_studio.captioning.joycaption import CAPTION_LENGTHS, CAPTION_TYPES

    g = p.add_argument_group("Florence-2")
    g.add_argument("--task", choices=list(FLORENCE_TASKS), default=None, help="default: from the style")
    g = p.add_argument_group("Qwen-VL and JoyCaption")
    g.add_argument("--instruction", default=None, help="what to ask the model (default: from the style)")
    g.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature; 0 = the same caption every run (JoyCaption's default 0.6)")
    g.add_argument("--4bit", dest="four_bit", action="store_true", help="Qwen-VL in 4-bit (CUDA GPU only)")
    g.add_argument("--max-pixels", type=int, default=None, help="Qwen-VL: largest image area (default 1048576)")
    g.add_argument("--caption-type", choices=list(CAPTION_TYPES), default=None, help="JoyCaption (default: style)")
    g.add_argument("--length", default=None,
                   help=f"JoyCaption length: {', '.join(CAPTION_LENGTHS)} or a number of words")
    g = p.add_argument_group("WD14 tagger")
    g.add_argument("--general-threshold", type=float, default=0.35, help="general tag threshold (default 0.35)")
    g.add_argument("--character-threshold", type=float, default=0.85, help="character tag threshold (default 0.85)")
    g.add_argument("--exclude", default="", help="tags to leave out, comma separated")
    g.add_argument("--keep-underscores", action="store_true", help="keep long_hair instead of long hair")
    g.add_argument("--rating", action="store_true", help="add the rating tag (general, sensitive, ...)")
    g = p.add_argument_group("BLIP and CLIP")
    g.add_argument("--prefix", default=None, help="BLIP: conditional start of every caption, e.g. 'a painting of'")
    g.add_argument("--style-tags", action="store_true", help="add CLIP-ranked medium/style/lighting/colour tags")


def add_caption_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``caption`` on ``subparsers`` (from ``parser.add_subparsers()``)."""
    from lora_studio.captioning import DEFAULT_CLIP
    from lora_studio.captioning.style import STYLES, TRIGGER_PLACEMENTS
    from lora_studio.captioning.token_limits import FAMILY_LIMITS

    p = subparsers.add_parser(
        "caption", help="auto-caption a folder of images (Florence-2, Qwen-VL, JoyCaption, WD14, BLIP)",
        description="Caption every image in a folder into metadata.csv. Existing captions are kept unless "
                    "--overwrite.")
    p.add_argument("--input", required=True, help="folder of training images (searched recursively)")
    p.add_argument("--output", default=None, help="metadata.csv to write (default: <input>/metadata.csv)")
    p.add_argument("--model", default="blip",
                   help="florence2, qwen-vl, joycaption, wd14, blip (default), a hub id or a model folder; "
                        "'none' with --tags or --style-tags")
    p.add_argument("--tags", default=None, help="a tagger (wd14 or its id/folder) whose tags follow the sentence")
    p.add_argument("--style", choices=list(STYLES), default=None,
                   help="tags, short or detailed (default: from --family, else tags for a tagger, else short)")
    p.add_argument("--family", choices=list(FAMILY_LIMITS), default=None,
                   help="the model family you will train: sets the style and checks caption lengths")
    p.add_argument("--base-model", default=None, help="the base model you will train (its family, exact token counts)")
    p.add_argument("--trigger", default=None, help="trigger word added to every caption")
    p.add_argument("--trigger-placement", choices=TRIGGER_PLACEMENTS, default="start",
                   help="where the trigger goes (a caption with [trigger] gets it there)")
    p.add_argument("--clip-model", default=DEFAULT_CLIP, help=f"CLIP model id or folder (default {DEFAULT_CLIP})")
    p.add_argument("--overwrite", action="store_true", help="replace existing captions too")
    p.add_argument("--txt", action="store_true", help="also write kohya .txt sidecars next to the images")
    p.add_argument("--batch-size", type=int, default=4, help="images per model call (default 4)")
    p.add_argument("--max-tokens", type=int, default=None, help="longest caption in generated tokens (default: style)")
    p.add_argument("--device", default=None, help="cuda, cpu or mps (default: cuda when available)")
    _add_model_options(p)
    p.set_defaults(func=cmd_caption)
    return p
