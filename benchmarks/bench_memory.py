"""Peak GPU memory and speed of a LoRA step for every SD1.5 and SDXL hardware preset.

Builds full-size UNets with random weights from the configs written below (SD1.5 at 512 px, SDXL at
1024 px; random weights cost the same time and memory as real ones, and nothing is downloaded), puts a
LoRA on them as the trainer does, and runs training steps with each preset's settings (batch size,
gradient checkpointing, precision, optimizer, resolution).

    python benchmarks/bench_memory.py                 # GPU: every preset, full size
    python benchmarks/bench_memory.py --count         # any machine: what the autograd graph keeps (meta device)
    python benchmarks/bench_memory.py --peak          # any machine: each preset's live peak of a real step (meta)
    python benchmarks/bench_memory.py --cpu           # CPU: the same code path on small shapes (testable)
    python benchmarks/bench_memory.py --flux          # any machine: the FLUX presets' step on the meta device

On a GPU it prints, per preset: peak memory (``torch.cuda.max_memory_allocated`` plus what the CUDA
context takes), the estimate of ``lora_studio.training.memory``, steps/s, and the achieved TFLOP/s against
the GPU's measured bf16 matrix throughput (a LoRA step costs about 2x the forward FLOPs, 3x with gradient
checkpointing). ``--count`` runs the UNets on the meta device (no memory, no compute) and reports the bytes
the autograd graph saves for the backward pass with and without gradient checkpointing: the constants of
the memory estimate come from it. ``--cpu`` runs reduced UNets at 64 px so the script stays testable
without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The real UNets' configs (diffusers names), so nothing has to be downloaded.
UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    ),
    "sd2": dict(
        sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
        norm_num_groups=32,
    ),
    "sdxl": dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, norm_num_groups=32,
    ),
}
# The SD1.x/SD2.x/SDXL VAE (all three share this shape).
VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=4, norm_num_groups=32, sample_size=512,
)
# Reduced shapes for --cpu: the same block types, a fraction of the channels.
SMALL_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": {**UNET_CONFIGS["sd15"], "block_out_channels": (32, 64, 64, 64), "cross_attention_dim": 32,
             "norm_num_groups": 8, "layers_per_block": 1},
    "sdxl": {**UNET_CONFIGS["sdxl"], "block_out_channels": (32, 64, 64), "cross_attention_dim": 64,
             "transformer_layers_per_block": (1, 1, 2), "attention_head_dim": (2, 4, 4), "norm_num_groups": 8,
             "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 80, "layers_per_block": 1},
}
POOLED_DIM = {"sdxl": 1280}
TOKENS = 77


# --- building ------------------------------------------------------------------------------------------
def build_unet(config: dict[str, Any], device: str | torch.device, dtype: torch.dtype, rank: int = 16):
    """A random-weight UNet with the trainer's LoRA (fp32 LoRA weights, frozen base in ``dtype``)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from lora_studio.families import SD_ATTENTION

    with torch.device(device):
        unet = UNet2DConditionModel(**config)
    unet.requires_grad_(False)
    unet.to(dtype=dtype)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=list(SD_ATTENTION)))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return unet


def unet_inputs(config: dict[str, Any], batch: int, resolution: int, device, dtype) -> tuple[tuple, dict]:
    """Noisy latents, timesteps and conditioning of the shapes the trainer passes."""
    side = resolution // 8
    latents = torch.randn(batch, 4, side, side, device=device, dtype=dtype)
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    kwargs: dict[str, Any] = {"encoder_hidden_states": torch.randn(batch, TOKENS, config["cross_attention_dim"],
                                                                   device=device, dtype=dtype)}
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, device=device, dtype=dtype),
                                       "time_ids": torch.full((batch, 6), float(resolution), device=device,
                                                              dtype=dtype)}
    return (latents, timesteps), kwargs


def lora_parameter_count(unet) -> int:
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


# --- counting on the meta device ------------------------------------------------------------------------
class _FlashLikeSDPA(torch.autograd.Function):
    """Stands in for CUDA's flash / memory-efficient attention: keeps q, k, v, out and the log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], device=q.device, dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - counting never runs backward
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def _sdpa(*args, **kwargs):
    """``scaled_dot_product_attention`` with flash attention's saved tensors (diffusers may pass q, k, v by name)."""
    q, k, v = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")[len(args):]])[:3]
    return _FlashLikeSDPA.apply(q, k, v)


def live_peak_of_steps(model, loss_of: Callable[[], torch.Tensor], dtype: torch.dtype, checkpointing: bool,
                       steps: int = 2) -> int:
    """The live-memory peak (bytes) of ``steps`` LoRA steps of ``model`` on the meta device: ``loss_of()`` (the
    forward and loss) under CUDA autocast's casting policy, backward, AdamW; diffusers' gradient checkpointing
    with autocast also while blocks are recomputed; flash attention's saved tensors. The second step has the
    optimizer state from the start."""
    if checkpointing:
        model.enable_gradient_checkpointing(gradient_checkpointing_func=functools.partial(
            torch.utils.checkpoint.checkpoint, use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), _AutocastLike(dtype))))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=False)
    tracker = _LiveBytes()
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _sdpa
    try:
        with tracker:
            for _ in range(steps):
                with _AutocastLike(dtype):
                    loss = loss_of()
                    loss.backward()
                del loss
                opt.step()
                opt.zero_grad(set_to_none=True)
    finally:
        torch.nn.functional.scaled_dot_product_attention = real_sdpa
    return tracker.peak


@dataclass
class ActivationCount:
    family: str
    resolution: int
    batch: int
    full_bytes: int          # saved for backward without checkpointing
    checkpointed_bytes: int  # kept between checkpointed units + the largest unit recomputed in backward
    lora_params: int
    unet_params: int
    forward_flops: int

    def per_megapixel(self) -> tuple[float, float]:
        mp = self.batch * self.resolution ** 2 / 1e6
        return self.full_bytes / mp, self.checkpointed_bytes / mp


class _AutocastLike(torch.overrides.TorchFunctionMode):
    """CUDA autocast's casting policy, for the meta device (where autocast itself does not run).

    Matrix ops run in half precision and normalisations in fp32, each casting its inputs to that dtype
    first, so the casts' copies are what the autograd graph keeps, as it does on a GPU.
    """

    LOW = {torch.nn.functional.linear, torch.nn.functional.conv2d, torch.matmul, torch.bmm, torch.baddbmm,
           torch.nn.functional.scaled_dot_product_attention}
    FP32 = {torch.nn.functional.group_norm, torch.nn.functional.layer_norm, torch.nn.functional.softmax,
            torch.exp, torch.nn.functional.mse_loss}

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = self.dtype if func in self.LOW else torch.float32 if func in self.FP32 else None
        if target is not None:
            def cast(x):
                return x.to(target) if torch.is_tensor(x) and x.is_floating_point() and x.dtype != target else x

            args = tuple(cast(a) for a in args)
            kwargs = {k: cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def count_activations(family: str, resolution: int, batch: int = 1, dtype: torch.dtype = torch.float16,
                      rank: int = 16, config: dict[str, Any] | None = None) -> ActivationCount:
    """What one LoRA step's autograd graph keeps, measured on the meta device (no memory, no compute).

    Every tensor saved for backward is recorded once (by storage). Tensors saved inside a unit that
    diffusers checkpoints (each ResNet block and each transformer block) form that unit's group; with
    checkpointing only the units' inputs and what lies outside the units stay, plus one unit's group
    while it is recomputed. Mixed precision follows CUDA autocast's policy (``_AutocastLike``); attention
    keeps what flash / memory-efficient attention keeps (``_FlashLikeSDPA``). ``dtype`` float32 models
    ``mixed_precision: no``.
    """
    from torch.utils.flop_counter import FlopCounterMode

    config = config or UNET_CONFIGS[family]
    unet = build_unet(config, "meta", dtype, rank)
    lora_params = lora_parameter_count(unet)
    unet_params = sum(p.numel() for p in unet.parameters()) - lora_params
    params = {p.untyped_storage()._cdata for p in unet.parameters()}
    sizes: dict[int, int] = {}
    owner: dict[int, int] = {}  # storage -> unit (-1: outside every unit)
    unit_inputs: set[int] = set()
    alive: list[torch.Tensor] = []  # a unit's inputs stay alive (checkpointing keeps them): no storage id reused
    current, next_unit = [-1], [0]

    def pack(t: torch.Tensor):
        sid = t.untyped_storage()._cdata
        if sid not in params:
            sizes[sid] = t.untyped_storage().nbytes()
            owner.setdefault(sid, current[0])
        return t

    def checkpoint_unit(module, *args):
        for a in args:
            if torch.is_tensor(a):
                sid = a.untyped_storage()._cdata
                unit_inputs.add(sid)
                sizes[sid] = a.untyped_storage().nbytes()
                alive.append(a)
        next_unit[0] += 1
        outer, current[0] = current[0], next_unit[0]
        try:
            return module(*args)
        finally:
            current[0] = outer

    unet.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_unit)
    unet.train()
    args, kwargs = unet_inputs(config, batch, resolution, "meta", dtype)
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _AutocastLike(dtype):
            unet(*args, **kwargs)
    finally:
        torch.nn.functional.scaled_dot_product_attention = real_sdpa
    unet.disable_gradient_checkpointing()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(*args, **kwargs)
    groups: dict[int, int] = {}
    for sid, unit in owner.items():
        if unit >= 0 and sid not in unit_inputs:
            groups[unit] = groups.get(unit, 0) + sizes[sid]
    kept = sum(sizes[s] for s in sizes if owner.get(s, -1) < 0 or s in unit_inputs)
    return ActivationCount(family, resolution, batch, full_bytes=sum(sizes.values()),
                           checkpointed_bytes=kept + max(groups.values(), default=0), lora_params=lora_params,
                           unet_params=unet_params, forward_flops=int(counter.get_total_flops()))


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """The most bytes held at once by tensors created while active (what ``max_memory_allocated`` adds to
    the memory in use before the step), counted by storage: a view or an in-place result of an existing
    tensor adds nothing, a storage counts until it is freed."""

    def __init__(self):
        super().__init__()
        import weakref

        self._seen = weakref.WeakKeyDictionary()
        self._finalize = weakref.finalize
        self.current = self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_flatten

        out = func(*args, **(kwargs or {}))
        inputs = {id(a.untyped_storage()) for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if storage in self._seen or id(storage) in inputs:
                continue
            nbytes = storage.nbytes()
            self._seen[storage] = nbytes
            self.current += nbytes
            self._finalize(storage, self._free, nbytes)
        self.peak = max(self.peak, self.current)
        return out


@dataclass
class StepPeak:
    family: str
    resolution: int
    batch: int
    checkpointing: bool
    weights_bytes: int     # frozen weights in half precision + the fp32 LoRA (in memory before the step)
    step_peak_bytes: int   # the most the step adds at once: activations, gradients, optimizer state, casts

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.step_peak_bytes


def measure_step_peak(family: str, resolution: int, batch: int, checkpointing: bool, optimizer: str = "adamw",
                      dtype: torch.dtype = torch.float16, rank: int = 16,
                      config: dict[str, Any] | None = None) -> StepPeak:
    """The live-memory peak of two real LoRA steps (forward, backward, optimizer) on the meta device.

    The same step as on a GPU, with CUDA autocast's casting policy (``_AutocastLike``, also while
    checkpointed blocks are recomputed, as autocast is) and flash attention's saved tensors and gradients
    (``_FlashLikeSDPA``); diffusers' own gradient checkpointing. Not counted: the CUDA context, cuBLAS and
    cuDNN workspaces and the caching allocator's fragmentation, which only a GPU shows. 8-bit AdamW keeps
    2 bytes of state a weight instead of AdamW's 8; the difference is subtracted (the state lives through
    the whole step).
    """
    config = config or UNET_CONFIGS[family]
    unet = build_unet(config, "meta", dtype, rank)
    args, kwargs = unet_inputs(config, batch, resolution, "meta", dtype)
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    peak = live_peak_of_steps(unet, lambda: torch.nn.functional.mse_loss(unet(*args, **kwargs).sample.float(),
                                                                        args[0].float()), dtype, checkpointing)
    if optimizer == "adamw8bit":
        peak -= sum(p.numel() for p in unet.parameters() if p.requires_grad) * (8 - 2)
    return StepPeak(family, resolution, batch, checkpointing, weights, peak)


# --- running steps ----------------------------------------------------------------------------------------
@dataclass
class StepResult:
    name: str
    peak_gb: float
    steps_per_s: float
    tflops: float
    estimate_gb: float
    resolution: int = 0


def _optimizer(name: str, params, say: Callable[[str], None]):
    from types import SimpleNamespace

    from lora_studio.training.optimizers import build_optimizer

    cfg = SimpleNamespace(optimizer=name, learning_rate=1e-4)
    return build_optimizer(cfg, [{"params": params}], say=lambda msg, level="info": say(msg))


def run_preset(name: str, family: str, values: dict[str, Any], device: str, steps: int, small: bool,
               say: Callable[[str], None] = print) -> StepResult:
    """Train ``steps`` LoRA steps (after 2 warm-up steps) with a preset's settings; memory and speed."""
    from lora_studio.config import TrainConfig
    from lora_studio.families import get_family
    from lora_studio.training.memory import estimate_breakdown

    cfg = TrainConfig().replace(**values)
    config = (SMALL_CONFIGS if small else UNET_CONFIGS)[family]
    resolution = 64 if small else (cfg.resolution or get_family(family).default_resolution)
    cuda = device == "cuda"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32) if cuda \
        else torch.float32
    gc.collect()
    unet = build_unet(config, device, dtype, cfg.lora_rank)
    text_encoder = None
    if family in ("sd15", "sd2") and not small:  # the SD1.5 trainer keeps its frozen text encoder on the GPU
        text_encoder = torch.empty(123_060_480, dtype=dtype, device=device)  # noqa: F841 - held during the steps
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = _optimizer(cfg.optimizer, params, say)
    if cuda:  # from here on: the weights are built (in fp32 first), the peak is the training step's
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    scaler = torch.amp.GradScaler("cuda") if cuda and dtype == torch.float16 else None
    autocast = torch.autocast("cuda", dtype=dtype) if cuda and dtype != torch.float32 else contextlib.nullcontext()
    args, kwargs = unet_inputs(config, cfg.batch_size, resolution, device, dtype)

    def step() -> None:
        with autocast:
            pred = unet(*args, **kwargs).sample
        loss = torch.nn.functional.mse_loss(pred.float(), args[0].float())
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2 if cuda else 1):  # warm-up (cuDNN autotuning, allocator)
        step()
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / steps
    if cuda:
        peak = (torch.cuda.max_memory_allocated() + cuda_context_bytes()) / 1e9
    else:
        peak = _rss_gb()
    flops = forward_flops(family, resolution) * cfg.batch_size if not small else 0
    factor = 3 if cfg.gradient_checkpointing else 2
    estimate = estimate_breakdown(cfg.replace(resolution=resolution), family).training_gb if not small else 0.0
    return StepResult(name, peak, 1 / seconds, flops * factor / seconds / 1e12, estimate, resolution)


@functools.lru_cache(maxsize=None)
def forward_flops(family: str, resolution: int) -> int:
    """FLOPs of one image's UNet forward (counted on the meta device)."""
    return count_activations(family, resolution, 1).forward_flops


def cuda_context_bytes() -> int:
    """GPU memory this process uses beyond PyTorch's allocator (CUDA context, cuBLAS/cuDNN handles)."""
    free, total = torch.cuda.mem_get_info()
    return max(total - free - torch.cuda.memory_reserved(), 0)


def measured_bf16_tflops(n: int = 8192, repeats: int = 20) -> float:
    """The GPU's bf16 matrix throughput, measured with a large matmul."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * repeats / (time.perf_counter() - started) / 1e12


def _rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


# --- reports -----------------------------------------------------------------------------------------
def report_count(families: list[str], say: Callable[[str], None] = print) -> list[ActivationCount]:
    say("| family | resolution | batch | saved for backward GB | with checkpointing GB | per MP (MB) | "
        "per MP checkpointed (MB) | LoRA params (rank 16) | UNet params | forward TFLOP |")
    say("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    out = []
    from lora_studio.families import get_family

    for family in families:
        res = get_family(family).default_resolution
        for batch in (1, 2):
            c = count_activations(family, res, batch)
            full_mp, ckpt_mp = c.per_megapixel()
            say(f"| {family} | {res} | {batch} | {c.full_bytes / 1e9:.2f} | {c.checkpointed_bytes / 1e9:.2f} | "
                f"{full_mp / 1e6:.0f} | {ckpt_mp / 1e6:.0f} | {c.lora_params:,} | {c.unet_params:,} | "
                f"{c.forward_flops / 1e12 / batch:.2f} |")
            out.append(c)
    return out


def report_presets(device: str, steps: int, small: bool, say: Callable[[str], None] = print,
                   only: set[str] | None = None) -> list[StepResult]:
    from lora_studio.presets import list_presets

    results = []
    peak_tflops = measured_bf16_tflops() if device == "cuda" else 0.0
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        say(f"Device: {props.name}, {props.total_memory / 1e9:.1f} GB; measured bf16 matmul {peak_tflops:.0f} TFLOP/s; "
            f"torch {torch.__version__}; {time.strftime('%Y-%m-%d')}")
    else:
        say(f"Device: CPU, reduced UNets at 64 px in fp32 (the code path only: peak is the process's RSS, not the "
            f"presets' GPU memory); torch {torch.__version__}")
    say("| preset | batch | checkpointing | precision | optimizer | resolution | peak GB | budget 90% GB | "
        "estimate GB | steps/s | TFLOP/s | % of bf16 peak |")
    say("|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for family in ("sd15", "sdxl"):
        for preset in list_presets(family):
            if only and preset.name not in only:
                continue
            v = preset.values
            try:
                r = run_preset(preset.name, family, v, device, steps, small, say=lambda m: None)
            except torch.cuda.OutOfMemoryError:
                say(f"| {preset.name} | {v.get('batch_size')} | ... | out of memory | | | | | | | | |")
                continue
            share = f"{100 * r.tflops / peak_tflops:.0f}%" if peak_tflops else "-"
            estimate = f"{r.estimate_gb:.2f}" if r.estimate_gb else "-"
            tflops = f"{r.tflops:.1f}" if r.tflops else "-"
            say(f"| {preset.name} | {v.get('batch_size', 1)} | {v.get('gradient_checkpointing', False)} | "
                f"{v.get('mixed_precision', 'fp16')} | {v.get('optimizer', 'adamw')} | {r.resolution} | "
                f"{r.peak_gb:.2f} | {0.9 * preset.vram_gb:.1f} | {estimate} | {r.steps_per_s:.2f} | {tflops} | "
                f"{share} |")
            results.append(r)
    return results


def measure_vae_encode_peak(resolution: int, batch: int, dtype: torch.dtype = torch.float32) -> int:
    """Live-memory peak (bytes) of the VAE encoding ``batch`` images while latents are cached (meta device).

    Flash attention stands in for the mid-block attention; PyTorch's math attention at 1024 px in half
    precision holds the (tokens x tokens) scores instead and peaks higher (about 2.3 GB per megapixel)."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**VAE_CONFIG)
    vae.to(dtype).requires_grad_(False)
    images = torch.empty(batch, 3, resolution, resolution, device="meta", dtype=dtype)
    tracker = _LiveBytes()
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _sdpa
    try:
        with torch.no_grad(), tracker:
            vae.encode(images).latent_dist.sample()
    finally:
        torch.nn.functional.scaled_dot_product_attention = real_sdpa
    return tracker.peak


# A Llama-3-8B-shaped language model (the LLM presets are written for 7-8B models).
LLM_SHAPE: dict[str, Any] = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)


def measure_llm_step_peak(batch: int, seq: int, checkpointing: bool, shape: dict[str, Any] | None = None,
                          rank: int = 16, trained_fraction: float = 0.5) -> StepPeak:
    """The live-memory peak of two real LoRA steps of a bf16 Llama model on the meta device.

    The trainer's step: LoRA (rank ``rank``) on q_proj and v_proj in fp32, autocast to bf16, logits only at
    the trained positions (the last ``trained_fraction`` of each sequence, as answers are), cross-entropy in
    fp32, transformers' own gradient checkpointing, flash attention (causal, no mask tensor). For QLoRA add
    the 4-bit weights instead of the bf16 ones: the step itself is the same.
    """
    import transformers.models.llama.modeling_llama as llama
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**(shape or LLM_SHAPE), max_position_embeddings=max(seq, 2048), tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to(torch.bfloat16).requires_grad_(False)
    model.config.use_cache = False
    if checkpointing:
        from lora_studio.training.runtime import enable_checkpointing

        enable_checkpointing(model, use_reentrant=False,
                             context_fn=lambda: (contextlib.nullcontext(), _AutocastLike(torch.bfloat16)))
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=False)
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    positions = torch.arange(seq - int(seq * trained_fraction), seq - 1, device="meta")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    tracker = _LiveBytes()
    real_sdpa, real_mask = torch.nn.functional.scaled_dot_product_attention, llama.create_causal_mask
    torch.nn.functional.scaled_dot_product_attention = _sdpa
    llama.create_causal_mask = lambda *args, **kwargs: None  # causal flash attention needs no mask tensor
    try:
        with tracker:
            for _ in range(2):
                with _AutocastLike(torch.bfloat16):
                    logits = model(input_ids=ids, logits_to_keep=positions).logits
                    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                                             ids[:, positions + 1].flatten())
                    loss.backward()
                del logits, loss
                opt.step()
                opt.zero_grad(set_to_none=True)
    finally:
        torch.nn.functional.scaled_dot_product_attention, llama.create_causal_mask = real_sdpa, real_mask
    return StepPeak("llm", seq, batch, checkpointing, weights, tracker.peak)


def report_llm_peaks(say: Callable[[str], None] = print) -> list[tuple[str, StepPeak, float]]:
    """The LLM presets' step on an 8B-shaped model (meta device) against the estimate's step part."""
    import json
    import tempfile

    from lora_studio.config import TrainConfig
    from lora_studio.presets import list_presets
    from lora_studio.training.memory import estimate_breakdown

    say("| LLM preset (8B shape) | batch | tokens | checkpointing | step peak GB | estimate of the step GB | "
        "estimate / measured |")
    say("|---|---:|---:|---|---:|---:|---:|")
    out = []
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps({**LLM_SHAPE, "model_type": "llama"}))
        for preset in list_presets("llm"):
            cfg = TrainConfig(base_model=folder).replace(**preset.values)
            peak = measure_llm_step_peak(cfg.batch_size, cfg.max_seq_length, cfg.gradient_checkpointing,
                                         rank=cfg.lora_rank)
            parts = estimate_breakdown(cfg, "llm").parts
            step = parts["activations"] + parts["LoRA weights, gradients and optimizer"]
            say(f"| {preset.name} | {cfg.batch_size} | {cfg.max_seq_length} | {cfg.gradient_checkpointing} | "
                f"{peak.step_peak_bytes / 1e9:.2f} | {step:.2f} | {step / (peak.step_peak_bytes / 1e9):.2f} |")
            out.append((preset.name, peak, step))
    return out


def report_peaks(say: Callable[[str], None] = print,
                 only: set[str] | None = None) -> list[tuple[str, StepPeak, float, float]]:
    """Per SD1.5/SDXL preset: the measured live peak on the meta device against the estimate's same parts.

    Returns (preset, StepPeak, measured GB with the frozen SD1.5 text encoder, estimate of the same GB)."""
    from lora_studio.config import TrainConfig
    from lora_studio.presets import list_presets
    from lora_studio.families import get_family
    from lora_studio.training.memory import CONTEXT_GB, WORKSPACE_GB, estimate_breakdown

    say("| preset | batch | checkpointing | resolution | weights GB | step peak GB | measured total GB | "
        "estimate of the same GB | estimate / measured |")
    say("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    out = []
    for family in ("sd15", "sdxl"):
        for preset in list_presets(family):
            if only and preset.name not in only:
                continue
            cfg = TrainConfig().replace(**preset.values)
            resolution = cfg.resolution or get_family(family).default_resolution
            dtype = torch.float32 if cfg.mixed_precision == "no" else torch.float16
            peak = measure_step_peak(family, resolution, cfg.batch_size, cfg.gradient_checkpointing, cfg.optimizer,
                                     dtype=dtype, rank=cfg.lora_rank)
            parts = estimate_breakdown(cfg, family).parts
            text_encoder = parts.get("text encoder weights", 0.0)  # the SD1.5 trainer keeps it on the GPU
            measured = peak.total_bytes / 1e9 + text_encoder
            same = sum(parts.values()) - CONTEXT_GB - WORKSPACE_GB
            say(f"| {preset.name} | {cfg.batch_size} | {cfg.gradient_checkpointing} | {resolution} | "
                f"{peak.weights_bytes / 1e9 + text_encoder:.2f} | {peak.step_peak_bytes / 1e9:.2f} | {measured:.2f} | "
                f"{same:.2f} | {same / measured:.2f} |")
            out.append((preset.name, peak, measured, same))
            gc.collect()
    from lora_studio.training.memory import VAE_ENCODE_GB_PER_MP

    say("")
    say("| latent caching: VAE encode | resolution | images at once | dtype | measured GB | per megapixel GB | "
        "estimate's per megapixel GB |")
    say("|---|---:|---:|---|---:|---:|---:|")
    for name, resolution, batch, dtype in (("SD1.x/SD2.x trainer", 512, 4, torch.float16),
                                           ("SDXL trainer", 1024, 1, torch.float32)):
        peak = measure_vae_encode_peak(resolution, batch, dtype)
        mp = batch * resolution ** 2 / 1e6
        half = 0.5 if dtype == torch.float16 else 1.0
        say(f"| {name} | {resolution} | {batch} | {str(dtype).replace('torch.', '')} | {peak / 1e9:.2f} | "
            f"{peak / 1e9 / mp:.2f} | {VAE_ENCODE_GB_PER_MP * half:.2f} |")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", action="store_true", help="count saved activations on the meta device")
    parser.add_argument("--peak", action="store_true",
                        help="measure each preset's live-memory peak of a real step on the meta device")
    parser.add_argument("--flux", action="store_true",
                        help="only the FLUX presets' live peak on the meta device (flux_memory.py; also in --peak)")
    parser.add_argument("--cpu", action="store_true", help="small shapes on the CPU even if a GPU is present")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--families", default="sd15,sd2,sdxl", help="for --count")
    parser.add_argument("--presets", default="", help="only these presets (comma-separated names)")
    args = parser.parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []" for every UNet
    only = {p for p in args.presets.split(",") if p} or None
    if args.count:
        report_count(args.families.split(","))
        return 0
    if args.peak or args.flux:
        from flux_memory import report_flux_peaks

        if args.peak:
            report_peaks(only=only)
            print()
            report_llm_peaks()
            print()
        report_flux_peaks()
        return 0
    gpu = torch.cuda.is_available() and not args.cpu
    report_presets("cuda" if gpu else "cpu", args.steps if gpu else min(args.steps, 2), small=not gpu, only=only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
