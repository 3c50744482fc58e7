"""The sizes ``blocks_to_swap`` moves: the weights of every repeated transformer block of the full-size models,
counted on the meta device from the released configs (the figures in ``lora_studio.training.memory_flux``).

The blocks are taken in the order the trainer swaps them (``block_swap.repeated_blocks``: FLUX double then single
blocks; blocks_to_swap N swaps the last N). Consecutive blocks of one size are printed as one run.

    python benchmarks/block_swap_sizes.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def models() -> dict[str, tuple[type, dict]]:
    """family (or family_variant) -> (transformer class, config) of the model each of ``FLOW_FIGURES`` describes."""
    from diffusers import (ChromaTransformer2DModel, Flux2Transformer2DModel, FluxTransformer2DModel,
                           QwenImageTransformer2DModel, SD3Transformer2DModel, ZImageTransformer2DModel)
    from flow_memory import DEV, KLEIN_4B, KLEIN_9B, LARGE, MEDIUM
    from flux_memory import FLUX_CONFIG
    from qwen_z_memory import QWEN_IMAGE_CONFIG, Z_IMAGE_CONFIG

    return {"flux": (FluxTransformer2DModel, FLUX_CONFIG), "chroma": (ChromaTransformer2DModel, {}),
            "qwen_image": (QwenImageTransformer2DModel, QWEN_IMAGE_CONFIG),
            "z_image": (ZImageTransformer2DModel, Z_IMAGE_CONFIG), "sd3": (SD3Transformer2DModel, LARGE),
            "sd3_medium": (SD3Transformer2DModel, MEDIUM),
            "flux2": (Flux2Transformer2DModel, KLEIN_4B), "flux2_klein9b": (Flux2Transformer2DModel, KLEIN_9B),
            "flux2_dev": (Flux2Transformer2DModel, DEV)}


def block_runs(cls: type, config: dict) -> tuple[int, tuple[tuple[int, int], ...]]:
    """(all weights, ((blocks, weights per block), ...) in swap order) of the model built on the meta device."""
    from lora_studio.training.block_swap import repeated_blocks

    with torch.device("meta"):
        model = cls(**config)
    runs: list[list[int]] = []
    for block in repeated_blocks(model):
        size = sum(p.numel() for p in block.parameters())
        if runs and runs[-1][1] == size:
            runs[-1][0] += 1
        else:
            runs.append([1, size])
    return sum(p.numel() for p in model.parameters()), tuple((n, size) for n, size in runs)


def main() -> None:
    for family, (cls, config) in models().items():
        total, runs = block_runs(cls, config)
        blocks = sum(n for n, _ in runs)
        in_blocks = sum(n * size for n, size in runs)
        print(f"{family:11s} {total:>15,} weights, {blocks} blocks ({in_blocks / total:.1%}): {runs}")


if __name__ == "__main__":
    main()
