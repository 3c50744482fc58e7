"""The export check: reload a written LoRA file into a fresh pipeline and compare images.

``check_export`` loads the base model again (float32), loads the LoRA file with diffusers'
``load_lora_weights`` (the same reader that loads kohya files for many users; DoRA, LoKr and LoHa files through
PEFT, ``lycoris.load_into_pipeline``, applied as A1111/Forge and ComfyUI apply them), renders the same prompt
and seed as the in-memory trained pipeline, and compares:

- strength 1 against ``expected_images`` (the trained pipeline's render, see ``render``): the file has
  every module, the right names, the right alpha;
- strength 0 against the fresh pipeline's own base render (must be identical) and against
  ``base_images`` when given.

Tolerance. The kohya file stores the LoRA weights in fp16, the trained model holds them in fp32, so the
two renders differ by rounding alone. The default ``atol`` (``DEFAULT_ATOL`` = 0.01 on images in [0, 1],
about 2.5 levels of 8-bit colour) is far above what fp16 rounding of the LoRA weights costs (measured on
the tiny models: below 1e-3) and far below what a wrong alpha, a missing module or a wrong block name
costs (these change the image by the size of the LoRA's effect). Because a small LoRA effect would make
any error small too, the report also gives the LoRA's own effect ``|expected - base|`` and warns when
it is below the tolerance (the check then cannot tell the LoRA from the base). Strength 0 must give the
base render exactly (``base_atol`` 0 on the same device, default 1e-5 to allow GPU kernels' jitter).

When the trained pipeline's frozen weights were held in half precision (mixed-precision training), pass
the dtype each component was held in as ``held_dtypes`` (``{"unet": torch.bfloat16, "vae": torch.float32,
...}``): the fresh pipeline's components are cast to it and back to float32, as the trainer cast them, so
its frozen weights round the same way (the SDXL trainer keeps its VAE in fp32 while the rest is in half).
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import TrainingError
from ..models.load_lock import model_loading
from .lycoris import load_into_pipeline

log = logging.getLogger(__name__)

DEFAULT_ATOL = 1e-2
VERIFY_ADAPTER = "verify"


def render(pipe, prompt: str, seed: int, steps: int = 2, size: int = 64) -> np.ndarray:
    """Deterministic render: a CPU generator seeded with ``seed``, ``output_type="np"`` (N, H, W, 3) in [0, 1]."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    with torch.no_grad():
        out = pipe(prompt=prompt, num_inference_steps=steps, height=size, width=size, generator=generator,
                   output_type="np")
    return np.asarray(out.images, dtype=np.float32)


@dataclass
class VerifyReport:
    """What the check measured: max absolute differences on images in [0, 1]."""

    lora_file: Path
    max_diff: float          # reloaded at strength 1 vs the trained model
    base_diff: float | None  # reloaded at strength 0 vs base_images (None when not given)
    self_base_diff: float    # reloaded at strength 0 vs the fresh pipeline before loading the LoRA
    effect: float            # how much the LoRA changes the image (expected vs base)
    atol: float

    @property
    def passed(self) -> bool:
        return self.max_diff <= self.atol

    def __str__(self) -> str:
        base = f", strength 0 vs base {self.base_diff:.2g}" if self.base_diff is not None else ""
        return (f"{self.lora_file.name} reloads to the trained output within {self.max_diff:.2g} "
                f"(tolerance {self.atol:g}; the LoRA itself changes the image by {self.effect:.2g}){base}")


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        raise TrainingError(f"Export check: image shapes differ ({a.shape} vs {b.shape}); "
                            "render both with the same steps and size.")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def load_fresh_pipeline(base_model: str | Path, family: str, *, device: str | torch.device = "cpu",
                        vae: str | None = None, held_dtypes: dict[str, torch.dtype] | None = None,
                        single_file_config: str | None = None):
    """The base model loaded anew, float32 on ``device``; components named in ``held_dtypes`` are rounded
    through that dtype first, as the trainer held them."""
    from ..models.loading import load_diffusion_pipeline

    pipe = load_diffusion_pipeline(str(base_model), family, vae=vae, single_file_config=single_file_config)
    for name, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        dtype = (held_dtypes or {}).get(name, torch.float32)
        if dtype != torch.float32:
            module.to(dtype)
        module.to(torch.float32)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_placed(model: torch.nn.Module, adapter: str) -> int:
    """How many modules of ``model`` carry the LoRA adapter ``adapter`` (what a loader really placed)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(1 for m in model.modules() if isinstance(m, BaseTunerLayer) and adapter in getattr(m, "scaling", {}))


def _check_placed(model: torch.nn.Module, expected: int, lora_file: Path) -> None:
    placed = count_placed(model, VERIFY_ADAPTER)
    if placed != expected:
        raise TrainingError(f"Export check failed: diffusers placed {placed} of the {expected} LoRA layers of "
                            f"{lora_file.name}; the others would be silently ignored. Please report this.")


def check_export(base_model: str | Path, family: str, lora_file: Path, *, expected_images: np.ndarray,
                 base_images: np.ndarray | None, prompt: str, seed: int, steps: int = 2, size: int = 64,
                 atol: float | None = None, base_atol: float = 1e-5, device: str | torch.device = "cpu",
                 vae: str | None = None, held_dtypes: dict[str, torch.dtype] | None = None,
                 single_file_config: str | None = None, fresh_pipeline: Callable[[], Any] | None = None,
                 expected_modules: int | None = None, denoiser: str = "unet") -> VerifyReport:
    """Reload ``lora_file`` into a fresh pipeline; raise ``TrainingError`` unless it reproduces the trained model.

    ``expected_images`` and ``base_images`` come from ``render`` on the in-memory pipeline (float32, LoRA
    on / adapters disabled) with the same prompt, seed, steps and size. ``fresh_pipeline`` builds the fresh
    pipeline instead of ``load_fresh_pipeline`` (e.g. with the same quantized base); with ``expected_modules``
    the modules of ``pipe.<denoiser>`` that really got the LoRA are counted (diffusers drops unknown keys silently).
    """
    pipe = fresh_pipeline() if fresh_pipeline else load_fresh_pipeline(
        base_model, family, device=device, vae=vae, held_dtypes=held_dtypes, single_file_config=single_file_config)
    try:
        return check_reload(pipe, lora_file, expected_images=expected_images, base_images=base_images, prompt=prompt,
                            seed=seed, steps=steps, size=size, atol=atol, base_atol=base_atol,
                            expected_modules=expected_modules, denoiser=denoiser, family=family)
    finally:
        del pipe
        gc.collect()


def check_reload(pipe, lora_file: Path, *, expected_images: np.ndarray, base_images: np.ndarray | None, prompt: str,
                 seed: int, steps: int = 2, size: int = 64, atol: float | None = None, base_atol: float = 1e-5,
                 expected_modules: int | None = None, denoiser: str = "unet", family: str = "sd15") -> VerifyReport:
    """The comparisons of ``check_export`` on ``pipe``, which renders the base model when called (a fresh pipeline,
    or the trained one with its own adapter switched off): load ``lora_file`` as the adapter ``verify``, count
    the layers placed, render at strength 1 and 0. The ``verify`` adapter is left loaded (the caller removes it)."""
    lora_file = Path(lora_file)
    atol = DEFAULT_ATOL if atol is None else float(atol)
    fresh_base = render(pipe, prompt, seed, steps, size)
    try:
        with model_loading(lora_file.name):
            load_into_pipeline(pipe, lora_file, family, VERIFY_ADAPTER)
    except Exception as exc:
        raise TrainingError(f"Export check failed: {lora_file.name} cannot be loaded into a fresh pipeline "
                            f"({exc.__class__.__name__}: {exc}).") from exc
    model = getattr(pipe, denoiser)
    if expected_modules is not None:
        _check_placed(model, expected_modules, lora_file)
    for name, param in model.named_parameters():  # as training holds a LoRA, also over a quantized base
        if f".{VERIFY_ADAPTER}." in name or name.endswith(f".{VERIFY_ADAPTER}"):  # LoKr/LoHa: ...lokr_w1.verify
            param.data = param.data.float()
    model.enable_adapters()  # a trained pipeline had its own adapter switched off
    pipe.set_adapters([VERIFY_ADAPTER], adapter_weights=[1.0])
    reloaded = render(pipe, prompt, seed, steps, size)
    pipe.set_adapters([VERIFY_ADAPTER], adapter_weights=[0.0])
    at_zero = render(pipe, prompt, seed, steps, size)
    reference_base = base_images if base_images is not None else fresh_base
    report = VerifyReport(lora_file=lora_file, max_diff=_max_diff(reloaded, expected_images),
                          base_diff=_max_diff(at_zero, base_images) if base_images is not None else None,
                          self_base_diff=_max_diff(at_zero, fresh_base),
                          effect=_max_diff(expected_images, reference_base), atol=atol)
    log.info("export check: %s", report)
    if report.max_diff > atol:
        raise TrainingError(
            f"Export check failed: {lora_file.name} loaded into a fresh pipeline gives images that differ from "
            f"the trained model by up to {report.max_diff:.3g} (tolerance {atol:g}; the LoRA's own effect is "
            f"{report.effect:.3g}). The file would not reproduce what was trained; please report this.")
    if report.self_base_diff > base_atol or (report.base_diff is not None and report.base_diff > base_atol):
        worst = max(report.self_base_diff, report.base_diff or 0.0)
        raise TrainingError(
            f"Export check failed: {lora_file.name} at strength 0 does not give the base model's images "
            f"(difference {worst:.3g}, allowed {base_atol:g}). The file changes the model even when switched off.")
    if report.effect <= atol:
        log.warning("Export check: the LoRA changes the test image by only %.3g (tolerance %g), so the check "
                    "cannot tell it from the base model; it has probably trained very little.", report.effect, atol)
    return report
