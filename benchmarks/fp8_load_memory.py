"""CPU memory of loading a transformer for ``base_quantization: fp8``, as the trainer does: ``from_pretrained`` in
bf16, then its layers stored in fp8 (``quantize_in_place``). What does a 32B FLUX.2 dev need in RAM to load?

A FLUX.1-shaped transformer at full width (3072) with fewer blocks (2 double + 6 single, 1.6B weights, 3.2 GB in
bf16) is written once with random weights, in bf16 (as the released models are) and in fp16; each is loaded in a
fresh process, which prints its peak anonymous memory while loading (sampled; the imports before it left out),
its peak resident memory including the pages of the mapped weight files (``ru_maxrss``: clean file pages, which
the kernel can drop and read again), the model's size as stored and the time.

    python benchmarks/fp8_load_memory.py [--double 2 --single 6]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class PeakMemory:
    """The largest anonymous resident memory (``RssAnon`` of /proc/self/status) a sampling thread sees: the
    process's own memory, without the pages of the weight files that safetensors maps."""

    def __init__(self, every: float = 0.005):
        self.peak, self.every, self.done = 0, every, False
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.done:
            self.peak = max(self.peak, self.now())
            time.sleep(self.every)

    @staticmethod
    def now() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> int:
        self.done = True
        self.thread.join()
        return max(self.peak, self.now())


def write_model(folder: Path, double: int, single: int, dtype: str) -> int:
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(num_layers=double, num_single_layers=single, guidance_embeds=True)
    model.to(getattr(torch, dtype)).save_pretrained(folder / "transformer", max_shard_size="2GB")
    return sum(p.numel() for p in model.parameters())


def load(folder: str) -> None:
    """In a child process: load ``folder`` as the trainer does for fp8 and print what it cost."""
    import torch
    from diffusers import FluxTransformer2DModel

    from lora_studio.training.quantize import quantize_in_place

    base, sampler, started = PeakMemory.now(), PeakMemory(), time.time()
    model = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer", dtype=torch.bfloat16)
    quantize_in_place(model, "fp8", torch.bfloat16)
    stored = sum(p.numel() * p.element_size() for p in model.parameters())
    anon, resident = sampler.stop() - base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"{anon / 1e9:.2f} {resident / 1e9:.2f} {stored / 1e9:.2f} {time.time() - started:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--double", type=int, default=2)
    parser.add_argument("--single", type=int, default=6)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return load(args.child)
    print("| files | weights | peak memory of the loading GB | peak resident, with mapped files GB "
          "| model as stored GB | seconds |\n|---|---:|---:|---:|---:|---:|")
    for dtype in ("bfloat16", "float16"):
        with tempfile.TemporaryDirectory() as tmp:
            weights = write_model(Path(tmp), args.double, args.single, dtype)
            out = subprocess.run([sys.executable, __file__, "--child", tmp], capture_output=True, text=True,
                                 check=True).stdout.split()
            print(f"| {dtype} | {weights:,} | {' | '.join(out[-4:])} |")


if __name__ == "__main__":
    main()
