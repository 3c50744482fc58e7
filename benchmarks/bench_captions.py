"""Tag shuffling and tag dropout with a frozen text encoder: encode the captions at every step, or cache variants?

With ``shuffle_tags`` or ``tag_dropout_rate`` every step sees new text, so the text conditioning cached once no
longer holds. Two ways out: encode the batch's captions at every step (the frozen encoders stay on the GPU), or
encode N variants of each caption once and pick one per step (memory grows with N, and only N orders are ever
seen). This script measures the first one's price on the real shapes (random weights, nothing downloaded):

- FLOPs of the text encoders' forward (77 tokens) and of a LoRA training step of the UNet (forward + backward),
  counted on the meta device for SD1.5 (CLIP-L) and SDXL (CLIP-L + OpenCLIP bigG);
- on the CPU, the time of both for SD1.5 at 512 px, batch 1 (``--no-time`` skips it: a minute or two);
- the memory the frozen encoders keep on the GPU (fp16), and what N cached variants would take in RAM.

    python benchmarks/bench_captions.py [--batch 1] [--variants 16] [--no-time]

The trainer encodes per step (``training/diffusion.py``); caption dropout alone only adds the empty caption to
the cache. Prints a table and writes it to the "Caption handling" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_memory import UNET_CONFIGS, build_unet, unet_inputs  # noqa: E402

CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
BIG_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
             num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
ENCODERS = {"sd15": [CLIP_L], "sdxl": [CLIP_L, BIG_G]}
RESOLUTION = {"sd15": 512, "sdxl": 1024}


def text_encoders(family: str, device: str):
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device(device):
        return [CLIPTextModel(CLIPTextConfig(**cfg)).eval() for cfg in ENCODERS[family]]


def encode(encoders, batch: int, device: str) -> None:
    ids = torch.zeros((batch, 77), dtype=torch.long, device=device)
    with torch.no_grad():
        for te in encoders:
            te(ids, output_hidden_states=True)


def unet_step(unet, family: str, batch: int, device: str) -> None:
    args, kwargs = unet_inputs(UNET_CONFIGS[family], batch, RESOLUTION[family], device, torch.float32)
    unet(*args, **kwargs).sample.float().mean().backward()


def count(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def measure(family: str, batch: int, variants: int) -> dict:
    encoders = text_encoders(family, "meta")
    unet = build_unet(UNET_CONFIGS[family], "meta", torch.float32)
    text_flops = count(lambda: encode(encoders, batch, "meta"))
    step_flops = count(lambda: unet_step(unet, family, batch, "meta"))
    params = sum(p.numel() for te in encoders for p in te.parameters())
    width = sum(cfg["hidden_size"] for cfg in ENCODERS[family])
    return {"family": family, "text_tflop": text_flops / 1e12, "step_tflop": step_flops / 1e12,
            "share": text_flops / (text_flops + step_flops), "encoder_gb": params * 2 / 1e9,
            "variant_mb": variants * 77 * width * 2 / 1e6}


def timed(family: str, batch: int, repeat: int = 2) -> tuple[float, float]:
    """CPU seconds of the text encoders' forward and of one UNet LoRA step (the faster of ``repeat``)."""
    torch.manual_seed(0)
    encoders = text_encoders(family, "cpu")
    unet = build_unet(UNET_CONFIGS[family], "cpu", torch.float32)
    out = []
    for fn in (lambda: encode(encoders, batch, "cpu"), lambda: unet_step(unet, family, batch, "cpu")):
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        out.append(best)
    return out[0], out[1]


def table(rows: list[dict], times: tuple[float, float] | None, batch: int, variants: int) -> str:
    lines = [f"| family | text encoders forward (TFLOP) | UNet LoRA step (TFLOP) | per-step encoding share | "
             f"encoders kept on the GPU (fp16) | {variants} cached variants per caption (RAM, fp16) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['text_tflop']:.3f} | {r['step_tflop']:.2f} | {100 * r['share']:.1f}% | "
                     f"{r['encoder_gb']:.2f} GB | {r['variant_mb']:.1f} MB per image |")
    text = "\n".join(lines) + f"\n\nBatch {batch}, 77 tokens, SD1.5 at 512 px, SDXL at 1024 px (FLOPs counted on the meta device)."
    if times:
        text += (f" Measured on the CPU, SD1.5 at 512 px, batch {batch}: text encoder {times[0]:.2f} s, UNet LoRA "
                 f"step {times[1]:.1f} s, so per-step encoding adds {100 * times[0] / times[1]:.1f}% to a step.")
    return text


def write_section(text: str) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    doc = path.read_text(encoding="utf-8")
    head = "## Caption handling (tag shuffling with a frozen text encoder)"
    import diffusers
    import transformers

    body = (f"{head}\n\nMeasured with `python benchmarks/bench_captions.py` on {date.today().isoformat()}, "
            f"{platform.processor() or platform.machine()} CPU, torch {torch.__version__}, diffusers "
            f"{diffusers.__version__}, transformers {transformers.__version__}.\n\n{text}\n\nDecision: the trainer encodes "
            "the captions at every step when they change (shuffle_tags, tag_dropout_rate): about 1% of a step's work "
            "(a few % on a CPU), no limit on the orders seen, no RAM per variant; the cost is the encoders' GPU memory "
            "(column 5). "
            "caption_dropout_rate alone caches one more entry, the empty caption.\n")
    if head in doc:
        start = doc.index(head)
        end = doc.find("\n## ", start + len(head))
        doc = doc[:start] + body + (doc[end + 1:] if end != -1 else "")
    else:
        doc = doc.rstrip() + "\n\n" + body
    path.write_text(doc, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--variants", type=int, default=16)
    parser.add_argument("--no-time", action="store_true", help="FLOPs only (skip the CPU timing)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md as it is")
    args = parser.parse_args()
    rows = [measure(family, args.batch, args.variants) for family in ("sd15", "sdxl")]
    times = None if args.no_time else timed("sd15", args.batch)
    text = table(rows, times, args.batch, args.variants)
    print(text)
    if not args.no_write:
        write_section(text)


if __name__ == "__main__":
    main()
