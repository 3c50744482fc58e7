"""A quantized frozen base for LoRA training (``base_quantization``): nf4, int8 or fp8 storage.

    mode = usable_quantization(config, device, say)          # "none" with one sentence when it cannot run here
    kwargs = load_kwargs(mode, compute_dtype, device)         # for from_pretrained (nf4: diffusers' bnb config)
    quantize_in_place(transformer, mode, compute_dtype)       # int8 / fp8 (and nf4 of a single-file model)

- **nf4**: bitsandbytes 4-bit NormalFloat through diffusers' ``BitsAndBytesConfig`` (about 0.56 bytes a weight
  with its scales). CUDA; under ``LORA_STUDIO_CPU_CHECK=1`` bitsandbytes' CPU kernels (the tests). As for the
  LLM trainer, the CPU repacking of 4-bit weights is switched off: a repacked layer gives its LoRA no gradient.
- **int8**: torchao weight-only int8 (``Int8WeightOnlyConfig``): 1 byte a weight, dequantized in the matmul;
  runs on the CPU too. Needs the ``torchao`` package.
- **fp8**: weights stored as float8 (e4m3) and cast up to the compute dtype layer by layer when used
  (diffusers' layerwise casting): 1 byte a weight, any device.

Only ``nn.Linear`` layers of the transformer are quantized; normalisations, embeddings and the LoRA stay in
their dtype (the LoRA in fp32). Each mode is deterministic, so the export check quantizes a fresh model the
same way and compares like with like.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from .runtime import cpu_check

NF4_BYTES = 0.56  # a 4-bit weight plus its blockwise absmax scales (double-quantized)
BYTES_PER_WEIGHT = {"none": 2.0, "nf4": NF4_BYTES, "int8": 1.0, "fp8": 1.0}
# Top-level layers kept in their dtype: the input projections, the time/text/guidance embedders and the output
# norm (small, sensitive). Named so that diffusers' bitsandbytes skip list matches exactly these (it compares
# child names, so a bare "proj_out" would also keep every single block's proj_out unquantized).
KEEP = ("x_embedder", "context_embedder", "norm_out", "time_text_embed", "distilled_guidance_layer",
        "t_embedder")  # Z-Image's timestep embedder casts its input to its weights' dtype: they must stay bf16


def usable_quantization(mode: str, device: torch.device, say: Callable[..., None] | None = None) -> str:
    """``mode`` when it can run on ``device`` with the installed packages, else "none" (said in one sentence)."""
    if mode == "none":
        return mode
    reason = None
    if mode == "nf4":
        if device.type != "cuda" and not cpu_check():
            reason = "base_quantization nf4 needs a CUDA GPU (bitsandbytes)"
        else:
            try:
                import bitsandbytes  # noqa: F401
            except Exception as exc:
                reason = f"base_quantization nf4 needs bitsandbytes ({exc.__class__.__name__}: {exc})"
    elif mode == "int8":
        try:
            import torchao.quantization  # noqa: F401
        except Exception as exc:
            reason = f"base_quantization int8 needs the torchao package ({exc.__class__.__name__}: {exc})"
    if reason is None:
        return mode
    if say:
        say(f"{reason}; training on an unquantized base instead (about twice the memory for its weights).", "warning")
    return "none"


def bnb_nf4_config(compute_dtype: torch.dtype):
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=list(KEEP))


@contextlib.contextmanager
def _allow_bnb_on_cpu(device: torch.device):
    """diffusers refuses bitsandbytes without a GPU; its CPU kernels work (``LORA_STUDIO_CPU_CHECK`` only)."""
    if device.type == "cuda":
        yield
        return
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer

    original = BnB4BitDiffusersQuantizer.validate_environment
    BnB4BitDiffusersQuantizer.validate_environment = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        BnB4BitDiffusersQuantizer.validate_environment = original


def load_with_quantization(load: Callable[..., Any], mode: str, compute_dtype: torch.dtype, device: torch.device):
    """``load(**kwargs)`` with nf4 applied while loading (diffusers' bitsandbytes config); other modes load plain
    and are applied by ``quantize_in_place``."""
    if mode != "nf4":
        return load()
    device_map = None if device.type == "cuda" else {"": "cpu"}
    with _allow_bnb_on_cpu(device):
        model = load(quantization_config=bnb_nf4_config(compute_dtype), device_map=device_map,
                     torch_dtype=compute_dtype)
    keep_4bit_unpacked(model)
    return model


def keep_4bit_unpacked(model: torch.nn.Module) -> None:
    """bitsandbytes repacks a 4-bit layer for fast CPU inference at its first no-grad forward; a LoRA on a
    repacked layer gets no gradient, so training keeps the weights as they are."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def quantizable(module: torch.nn.Module, name: str) -> bool:
    """Whether ``base_quantization`` stores this layer quantized: every ``nn.Linear`` outside ``KEEP``."""
    return isinstance(module, torch.nn.Linear) and name.split(".")[0] not in KEEP


def quantize_in_place(model: torch.nn.Module, mode: str, compute_dtype: torch.dtype) -> None:
    """int8 (torchao weight-only) or fp8 (float8 storage, cast up at use) on an already loaded model."""
    if mode == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig(), filter_fn=quantizable)
    elif mode == "fp8":
        from diffusers.hooks import apply_layerwise_casting

        for name, module in model.named_modules():
            if quantizable(module, name):
                apply_layerwise_casting(module, storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype,
                                        skip_modules_pattern=())
    elif mode == "nf4":
        _nf4_in_place(model, compute_dtype)


def _nf4_in_place(model: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """nf4 of a model loaded without diffusers' quantization config (a single-file checkpoint)."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not quantizable(child, full):
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True,
                                      device="meta")
            layer.weight = bnb.nn.Params4bit(child.weight.data.to(compute_dtype), requires_grad=False,
                                             quant_type="nf4", compress_statistics=True)
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
            setattr(module, child_name, layer)
    keep_4bit_unpacked(model)
