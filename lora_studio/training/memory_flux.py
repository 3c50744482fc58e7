"""The GPU memory estimate of a FLUX.1 or Chroma LoRA run (``memory.estimate_breakdown`` calls it).

Training phase: CUDA context + the transformer's weights as stored (``base_quantization``: bf16 2 bytes a
weight, nf4 0.56, int8 and fp8 1; the top-level embedders stay bf16) + one dequantized layer for a quantized
base + the LoRA's fp32 weights, gradients and optimizer state + activations + workspace. The text encoders
and the VAE are not on the GPU while training (their outputs are cached first).

Activations: every token of the joint sequence (image tokens ``(resolution / 16)^2`` plus the T5 tokens,
``max_sequence_length``) costs the same in every block, so the activations are ``tokens x batch x bytes per
token``. The bytes per token are what ``benchmarks/flux_memory.py`` measures: the live peak of two real LoRA
steps of the full-size FLUX.1 transformer on the meta device (bf16 autocast, flash attention, rank 16 on the
attention layers) at 512 and 1024 px, with and without diffusers' gradient checkpointing; the slope between
the two sizes is the per-token cost (the LoRA's own state is the intercept, counted apart). Chroma has the
same blocks, so the same cost per token.

Caching phase: the VAE alone encoding one image, then the text encoders alone (T5-XXL in bf16 is 9.5 GB:
the largest single thing a FLUX run puts on a 12 GB card).

Block swap (``blocks_to_swap`` N, ``block_swap.py``): the last N blocks' weights (``FlowFigures.swap_runs``, counted
on the meta device by ``benchmarks/block_swap_sizes.py``) leave the resident weights; one swapped block is on the
GPU at a time, as stored plus, for a quantized base, its layers cast up to bf16 (what autograd keeps for the
backward pass of the recomputed block). ``swap_note`` gives the PCIe traffic of a step (forward and recomputation).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import TrainConfig, block_indices

ACT_BYTES_PER_TOKEN = {"ckpt": 542_000, "full": 6_407_600}  # bf16, measured (benchmarks/flux_memory.py)
DEQUANTIZED_LAYER_GB = 0.1  # the largest layer (single block proj_out, 47 M weights) in bf16 while it computes


@dataclass(frozen=True)
class FlowFigures:
    transformer_params: int
    kept_params: int                        # top-level embedders, never quantized
    text_encoder_params: tuple[int, ...]
    lora_per_rank: dict[str, tuple[int, int]]  # lora_targets -> (all double blocks, all single blocks)
    blocks: tuple[int, int] = (19, 38)
    vae_params: int = 83_819_683
    act_bytes: dict[str, int] | None = None    # bytes per token (ckpt / full); None: FLUX's
    text_tokens: int | None = None          # captions not padded: this many tokens at most; None: max_sequence_length
    text_offloads: bool = False             # the text encoder encodes on the CPU when it does not fit the GPU
    clip_tokens: int = 0                    # text tokens besides max_sequence_length (SD3: CLIP's 77)
    caching_text_params: int = 0            # encoders on the GPU at once while caching (0: all of them)
    swap_runs: tuple[tuple[int, int], ...] = ()  # the repeated blocks in swap order: (blocks, weights per block)


_LORA = {"attention": (933_888, 700_416), "all_linear": (2_101_248, 1_984_512)}
FLOW_FIGURES = {
    "flux": FlowFigures(11_901_408_320, 66_982_976, (123_060_480, 4_762_310_656), _LORA,
                        swap_runs=((19, 339_831_296), (38, 141_591_808))),
    "chroma": FlowFigures(8_899_983_424, 293_075_008, (4_762_310_656,), _LORA,
                          swap_runs=((19, 226_548_224), (38, 113_271_040))),
    # Qwen-Image: the 20B transformer (60 dual-stream blocks), Qwen2.5-VL-7B (16.6 GB in bf16: on a smaller card the
    # captions are encoded on the CPU), the 3-D VAE; bytes per token measured by benchmarks/qwen_z_memory.py;
    # a detailed caption is at most about 256 tokens (not padded)
    "qwen_image": FlowFigures(20_430_401_088, 29_110_272, (8_292_166_656,),
                              {"attention": (2_949_120, 0), "all_linear": (6_635_520, 0)}, blocks=(60, 1),
                              vae_params=126_892_531, act_bytes={"ckpt": 603_568, "full": 8_223_162}, text_tokens=256,
                              text_offloads=True, swap_runs=((60, 339_831_296),)),
    # Z-Image-Turbo: the 6.15B transformer (30 main layers, 2 + 2 refiners), Qwen3-4B (8 GB in bf16), FLUX's VAE;
    # bytes per token measured by benchmarks/qwen_z_memory.py
    "z_image": FlowFigures(6_154_908_736, 0, (4_022_468_096,),
                           {"attention": (921_600, 0), "all_linear": (2_188_800, 0)},
                           blocks=(30, 1), act_bytes={"ckpt": 553_972, "full": 7_895_304}, text_tokens=256,
                           text_offloads=True, swap_runs=((2, 180_910_336), (2, 176_962_816), (30, 180_910_336))),
    # SD3.5 Large (8.1B MMDiT, 38 joint blocks; Medium's 2.2B is smaller in every part): CLIP-L, CLIP-G, T5-XXL;
    # bytes per token measured by benchmarks/flow_memory.py (Medium: 191,312 / 2,224,536)
    "sd3": FlowFigures(8_056_627_520, 39_398_400, (123_650_304, 694_659_840, 4_762_310_656),
                       {"attention": (1_473_792, 0), "all_linear": (3_297_792, 0)}, blocks=(38, 0),
                       vae_params=83_653_863, act_bytes={"ckpt": 345_944, "full": 4_132_872}, clip_tokens=77,
                       caching_text_params=4_762_310_656,  # CLIP-L + CLIP-G, then T5-XXL alone
                       swap_runs=((37, 212_999_680), (1, 136_085_248))),
    # FLUX.2 klein 4B (3.9B, 5 double + 20 single blocks) with Qwen3-4B; klein 9B (9.1B, 8 + 24, Qwen3-8B: 16.4 GB
    # in bf16 while caching) costs 607,656 / 6,126,648 bytes a token; both measured by benchmarks/flow_memory.py
    "flux2": FlowFigures(3_875_544_576, 42_860_544, (4_022_468_096,),
                         {"attention": (245_760, 614_400), "all_linear": (583_680, 921_600)}, blocks=(5, 20),
                         vae_params=84_046_115, act_bytes={"ckpt": 413_000, "full": 3_591_688},
                         swap_runs=((5, 245_367_296), (20, 122_683_648))),
    # SD3.5 Medium (2.2B MMDiT-X, 24 joint blocks, the first 13 with a second attention): the same text encoders
    # and VAE; bytes per token measured by benchmarks/flow_memory.py
    "sd3_medium": FlowFigures(2_243_171_520, 19_378_176, (123_650_304, 694_659_840, 4_762_310_656),
                              {"attention": (746_496, 0), "all_linear": (1_468_416, 0)}, blocks=(24, 0),
                              vae_params=83_653_863, act_bytes={"ckpt": 191_312, "full": 2_224_536}, clip_tokens=77,
                              caching_text_params=4_762_310_656,
                              swap_runs=((13, 101_506_944), (10, 84_980_992), (1, 54_294_784))),
    # The variants of a family (``Family.variant_of``: "<family>_<variant>"). FLUX.2 klein 9B: Qwen3-8B;
    # FLUX.2 dev: the 32B transformer (8 double + 48 single blocks of width 6144) with Mistral Small 3.1 24B
    # (46.7 GB in bf16: encoded on the CPU unless the GPU has room), both measured by benchmarks/flow_memory.py
    "flux2_klein9b": FlowFigures(9_078_581_248, 84_410_368, (8_190_735_360,),
                                 {"attention": (524_288, 983_040), "all_linear": (1_245_184, 1_474_560)},
                                 blocks=(8, 24), vae_params=84_046_115, text_offloads=True,
                                 act_bytes={"ckpt": 607_656, "full": 6_126_648},
                                 swap_runs=((8, 436_208_128), (24, 218_104_064))),
    "flux2_dev": FlowFigures(32_223_281_152, 170_655_744, (23_340_272_640,),
                             {"attention": (786_432, 2_949_120), "all_linear": (1_867_776, 4_423_680)},
                             blocks=(8, 48), vae_params=84_046_115,
                             act_bytes={"ckpt": 1_205_864, "full": 15_691_256}, text_offloads=True,
                             swap_runs=((8, 981_467_648), (48, 490_733_824))),
}


def figures_for(config: TrainConfig, family: str) -> FlowFigures:
    """The figures of the model the run trains: the family's, or its variant's (FLUX.2 dev, klein 9B) when the
    registry's ``variant`` hook tells the base model apart."""
    from ..families import get_family

    variant = get_family(family).variant_of(config.base_model) if family in FLOW_FIGURES else ""
    return FLOW_FIGURES.get(f"{family}_{variant}") or FLOW_FIGURES.get(family, FLOW_FIGURES["flux"])


def _block_share(config: TrainConfig, count: int, key: str) -> float:
    kept = block_indices(getattr(config, key), key)
    if not count:
        return 0.0
    return 1.0 if kept is None else len([i for i in kept if i < count]) / count


def lora_parameters(config: TrainConfig, fig: FlowFigures) -> float:
    """LoRA weights of the run (the preset's layers, the block filters; custom target_modules as the preset)."""
    double, single = fig.lora_per_rank.get(config.lora_targets, fig.lora_per_rank["attention"])
    return config.lora_rank * (double * _block_share(config, fig.blocks[0], "train_double_block_indices")
                               + single * _block_share(config, fig.blocks[1], "train_single_block_indices"))


def swapped_blocks(count: int, fig: FlowFigures) -> tuple[int, int]:
    """(weights of the last ``count`` blocks, weights of the largest of them) from the figures' swap order."""
    sizes = [size for n, size in fig.swap_runs for _ in range(n)][-count:] if count else []
    return sum(sizes), max(sizes, default=0)


def swap_note(config: TrainConfig, family: str) -> str | None:
    """What ``blocks_to_swap`` costs: the weights kept in CPU memory and the bytes a step moves over PCIe."""
    from .block_swap import PCIE_GB_PER_S, step_traffic
    from .memory import GB

    fig = figures_for(config, family) if family in FLOW_FIGURES else None
    if not config.blocks_to_swap or fig is None or not fig.swap_runs:
        return None
    swapped, _ = swapped_blocks(config.blocks_to_swap, fig)
    stored = swapped * _stored_bytes(config) / GB
    traffic = step_traffic(stored, config.gradient_checkpointing)
    return (f"blocks_to_swap {config.blocks_to_swap}: {stored:.1f} GB of block weights stay in CPU memory and each "
            f"step moves {traffic:.1f} GB to the GPU (forward and recomputation), about "
            f"{traffic / PCIE_GB_PER_S:.1f} s at {PCIE_GB_PER_S:g} GB/s (PCIe 4.0 x16).")


def _stored_bytes(config: TrainConfig) -> float:
    """Bytes of a frozen transformer weight as stored (``base_quantization``, else the training precision)."""
    from .quantize import BYTES_PER_WEIGHT

    if config.base_quantization != "none":
        return BYTES_PER_WEIGHT[config.base_quantization]
    return 2 if config.mixed_precision != "no" else 4


def estimate_flow(config: TrainConfig, family: str, *, context_gb: float, workspace_gb: float,
                  overhead: float, optimizer_bytes: int, vae_gb_per_mp: float):
    """``MemoryEstimate`` parts of a FLUX/Chroma run (the constants shared with the UNet estimate are passed in)."""
    from .memory import GB, MemoryEstimate

    fig = figures_for(config, family)
    resolution = config.resolution_for(family)
    half = config.mixed_precision != "no"
    stored = _stored_bytes(config)
    swapped, largest = swapped_blocks(config.blocks_to_swap, fig)
    weights = (fig.transformer_params - fig.kept_params - swapped) * stored + fig.kept_params * (2 if half else 4)
    text_tokens = min(config.max_sequence_length, fig.text_tokens or config.max_sequence_length)
    tokens = (resolution // 16) ** 2 + text_tokens + fig.clip_tokens
    per_token = (fig.act_bytes or ACT_BYTES_PER_TOKEN)["ckpt" if config.gradient_checkpointing else "full"]
    per_token *= 1 if half else 2
    parts = {
        "CUDA context": context_gb,
        "transformer weights": weights / GB,
        "LoRA weights, gradients and optimizer": lora_parameters(config, fig) * optimizer_bytes / GB,
        "activations": tokens * config.batch_size * per_token * (1 + overhead) / GB,
        "workspace": workspace_gb + (DEQUANTIZED_LAYER_GB if config.base_quantization != "none" else 0.0),
    }
    if swapped:  # the swapped block on the GPU now: as stored, plus its layers cast up to bf16 for a quantized base
        parts["swapped block in flight"] = largest * (stored + (2 if config.base_quantization != "none" else 0)) / GB
    megapixels = resolution * resolution / 1e6
    vae = fig.vae_params * 2 / GB + vae_gb_per_mp / 2 * megapixels
    text = sum(fig.text_encoder_params) * (2 if half else 4) / GB
    if config.shuffle_tags or config.tag_dropout_rate:  # captions encoded at every step: the encoders stay
        parts["text encoder weights"] = text
    caching_text = fig.caching_text_params * (2 if half else 4) / GB if fig.caching_text_params else text
    caching = context_gb + workspace_gb + max(vae, 0.0 if fig.text_offloads else caching_text)
    return MemoryEstimate(family, {k: round(v, 3) for k, v in parts.items()}, round(caching, 3))
