"""Captioning speed: images per second of each captioner (BLIP, Florence-2, Qwen2.5-VL, Qwen3-VL, JoyCaption, WD14).

By default it runs the tiny offline models of each architecture (``lora_studio.models.tiny_vlms``) on the CPU:
that measures LoRA Studio's own cost per image (decoding, resizing once, the processor, batching, decoding
the answer) more than the models', since their weights are tiny. On a machine that has the real models
(downloaded once, or as folders), ``--real`` runs each captioner's default hub model (or ``--model
NAME=ID_OR_DIR``) on the GPU in bf16.

    python benchmarks/bench_captioners.py [--images 16] [--size 512] [--batch 4] [--tokens 16] [--no-write]
    python benchmarks/bench_captioners.py --real --device cuda --model qwen-vl=Qwen/Qwen2.5-VL-7B-Instruct

Each captioner is loaded once (load time is reported apart), warmed up on one batch, then timed over the
whole set. Prints a table and writes it to the "Captioners" section of docs/benchmarks.md with the date,
device and library versions.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NAMES = ("blip", "florence2", "qwen-vl", "qwen3-vl", "joycaption", "wd14")
TINY_NOTE = ("With tiny weights these figures are LoRA Studio's own cost per image (decoding the file, one resize, the "
             "processor, the generate loop, decoding the answer); real models are bound by their size, so real-model "
             "figures need `--real` on a GPU.")


def make_images(folder: Path, count: int, size: int) -> list[Path]:
    """``count`` photo-sized test images (noise over colour gradients), some not square."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        w, h = (size, size) if i % 2 == 0 else (size, size * 3 // 4)
        base = np.linspace(0, 255, w)[None, :, None] * rng.random(3)[None, None, :]
        pixels = np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype("uint8")
        paths.append(folder / f"img_{i:03d}.jpg")
        Image.fromarray(pixels).save(paths[-1], quality=90)
    return paths


def captioners(args, models: dict[str, str]):
    from lora_studio.captioning.choose import CaptionerOptions, make_captioner

    options = CaptionerOptions(style="short", max_new_tokens=args.tokens, batch_size=args.batch,
                               device=args.device, temperature=0.0)
    for name, ref in models.items():
        yield name, ref, make_captioner(ref, options, kind="qwen-vl" if name == "qwen3-vl" else name)


def measure(captioner, images: list[Path]) -> dict:
    started = time.perf_counter()
    captioner.load()
    loaded = time.perf_counter() - started
    try:
        captioner.caption(images[: captioner.batch_size])  # warm-up
        started = time.perf_counter()
        results = captioner.caption(images)
        seconds = time.perf_counter() - started
    finally:
        captioner.release()
    ok = sum(1 for r in results if r.ok)
    return {"load_s": loaded, "seconds": seconds, "ok": ok, "per_s": ok / seconds if seconds else 0.0,
            "example": next((r.text for r in results if r.ok), "")}


def table(rows: list[tuple[str, str, dict]]) -> str:
    lines = ["| captioner | model | images/s | load s | captioned |", "|---|---|---:|---:|---:|"]
    for name, ref, m in rows:
        lines.append(f"| {name} | `{Path(ref).name if Path(ref).exists() else ref}` | {m['per_s']:.2f} | "
                     f"{m['load_s']:.1f} | {m['ok']} |")
    return "\n".join(lines)


def environment(device: str) -> str:
    import torch
    import transformers

    try:
        import onnxruntime

        ort = f", onnxruntime {onnxruntime.__version__}"
    except ImportError:
        ort = ""
    if device.startswith("cuda") and torch.cuda.is_available():
        where = f"GPU {torch.cuda.get_device_name(0)} (bf16)"
    else:
        where = f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads, fp32)"
    return (f"Device: {where}. torch {torch.__version__}, transformers {transformers.__version__}{ort}, "
            f"Python {platform.python_version()}.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--size", type=int, default=512, help="long side of the test images in px")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=16, help="tokens generated per caption")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (tiny models: 1 is fastest)")
    p.add_argument("--real", action="store_true", help="the captioners' real default models instead of tiny ones")
    p.add_argument("--model", action="append", default=[], help="NAME=ID_OR_DIR, e.g. florence2=/models/florence")
    p.add_argument("--only", default=",".join(NAMES), help="comma-separated captioners to run")
    p.add_argument("--no-write", action="store_true", help="only print, do not update docs/benchmarks.md")
    args = p.parse_args()

    import torch

    from lora_studio.captioning.choose import default_model

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-captioners-"))
    wanted = [n for n in args.only.split(",") if n]
    if args.real:
        models = {n: default_model("qwen-vl" if n == "qwen3-vl" else n) for n in wanted if n != "qwen3-vl"}
    else:
        from lora_studio.models.tiny_captioners import build_tiny_blip
        from lora_studio.models.tiny_vlms import build_tiny_vlm_captioners

        built = {**build_tiny_vlm_captioners(work / "models"), "blip": build_tiny_blip(work / "models" / "blip")}
        models = {n: str(built[n]) for n in wanted}
    models.update(dict(item.split("=", 1) for item in args.model))
    images = make_images(work / "images", args.images, args.size)
    rows = []
    for name, ref, captioner in captioners(args, models):
        rows.append((name, ref, measure(captioner, images)))
        print(f"{name}: {rows[-1][2]['per_s']:.2f} images/s ({rows[-1][2]['example'][:60]!r})", flush=True)
    kind = "real models" if args.real else "tiny random-weight models of each architecture"
    text = "\n".join([
        "## Captioners", "",
        f"Measured with `python benchmarks/bench_captioners.py{' --real' if args.real else ''}` on {date.today()}: "
        f"{kind}, {args.images} JPEG images of {args.size} px (half 4:3), batch {args.batch}, {args.tokens} new "
        f"tokens per caption, greedy. {environment(args.device)}", "",
        table(rows), "",
        *([] if args.real else [TINY_NOTE, ""]),
    ])
    print(text)
    if not args.no_write:
        from bench_llm import write_docs

        write_docs(text, section="## Captioners")
        print(f"Written to {ROOT / 'docs' / 'benchmarks.md'} (section Captioners).")


if __name__ == "__main__":
    main()
