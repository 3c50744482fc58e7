"""What this machine trains on: the GPU (CUDA, ROCm, Apple MPS) or the CPU, and which PyTorch build is installed.

    detect_gpu()            {"name", "memory_gb", "count"} of the first CUDA/ROCm GPU, or None
    device_kind()           "cuda", "mps" or "cpu": where a run will train
    describe_device()       one line for the app's header and ``doctor``
    build_warning()         a sentence when an NVIDIA GPU is present but PyTorch cannot use it, else None
    adapt_precision(...)    mixed precision as the device supports it (fp16 -> bf16/fp32 on MPS, ...)

ROCm builds of PyTorch report AMD GPUs through ``torch.cuda`` (``torch.version.hip`` is set), so they take
the CUDA paths. The functions that decide take their inputs as arguments, so they are tested with fakes.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from typing import Any


def detect_gpu() -> dict[str, Any] | None:
    """Name and memory of the first CUDA (or ROCm) GPU, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "memory_gb": props.total_memory / 1e9, "count": torch.cuda.device_count()}


def mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def device_kind() -> str:
    """Where accelerate will put a run: "cuda" (also ROCm), "mps" or "cpu"."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    return "mps" if mps_available() else "cpu"


@functools.lru_cache(maxsize=1)
def mps_supports_bf16() -> bool:
    """bf16 tensors work on this Mac's GPU (macOS 14 and newer)."""
    import torch

    try:
        torch.ones(1, dtype=torch.bfloat16, device="mps")
        return True
    except Exception:
        return False


def adapt_precision(requested: str, kind: str, *, bf16_ok: bool = False,
                    cpu_check: bool = False) -> tuple[str, str | None]:
    """The mixed precision a run on ``kind`` uses for ``requested``, and a sentence when it differs."""
    if requested == "no" or kind == "cuda":
        return requested, None
    if kind == "mps":
        if bf16_ok:
            if requested == "bf16":
                return "bf16", None
            return "bf16", ("Apple GPU (MPS): training in bf16 instead of fp16 (fp16 needs loss scaling, which MPS "
                            "lacks).")
        return "no", (f"Apple GPU (MPS): mixed_precision '{requested}' is not supported by this macOS (bf16 needs "
                      "macOS 14); training in full precision (fp32), which needs about twice the memory.")
    if requested == "bf16" and cpu_check:
        return "bf16", None
    return "no", (f"No CUDA GPU found: training on the CPU in full precision (mixed_precision '{requested}' is "
                  "ignored). This is fine for tiny tests; real models need a GPU.")


def torch_build() -> dict[str, Any]:
    """The installed PyTorch: version, CUDA / ROCm version of the build (None for a CPU build), MPS."""
    import torch

    return {"version": torch.__version__, "cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None),
            "mps": mps_available()}


def build_text(build: dict[str, Any]) -> str:
    if build.get("hip"):
        return f"PyTorch {build['version']} (ROCm {build['hip']} build)"
    if build.get("cuda"):
        return f"PyTorch {build['version']} (CUDA {build['cuda']} build)"
    return f"PyTorch {build['version']} ({'MPS' if build.get('mps') else 'CPU-only'} build)"


def nvidia_smi_names() -> list[str] | None:
    """The NVIDIA GPUs ``nvidia-smi -L`` lists (None when there is no nvidia-smi or it fails)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    from .torch_build import gpu_names

    return gpu_names(done.stdout) or None


def build_warning(build: dict[str, Any], nvidia_names: list[str] | None, cuda_usable: bool) -> str | None:
    """A sentence when an NVIDIA GPU is in the machine but this PyTorch cannot use it."""
    if not nvidia_names or cuda_usable:
        return None
    from .versions import repair_command

    gpus = ", ".join(nvidia_names)
    if not build.get("cuda"):
        return (f"This computer has {gpus}, but the installed PyTorch is a CPU-only build, so training would run on "
                f"the CPU. Fix: run '{repair_command()}' (it installs the CUDA build for your driver; unset "
                "LORA_STUDIO_TORCH first if you set it).")
    return (f"This computer has {gpus} and a CUDA {build['cuda']} build of PyTorch, but CUDA cannot be used "
            "(usually an NVIDIA driver older than that build needs). Update the driver from nvidia.com/drivers, "
            f"then run '{repair_command()}'.")


def describe_device() -> tuple[str, str | None]:
    """(one line naming the device and the PyTorch build, a warning or None) for the app's header and doctor."""
    import torch

    build = torch_build()
    gpu = detect_gpu()
    if gpu is not None:
        kind = "AMD GPU" if build.get("hip") else "GPU"
        count = f" (x{gpu['count']})" if gpu["count"] > 1 else ""
        line = f"{kind}: {gpu['name']}{count}, {gpu['memory_gb']:.1f} GB; {build_text(build)}"
    elif build.get("mps"):
        line = f"Apple GPU (MPS); {build_text(build)}"
    else:
        line = f"CPU only; {build_text(build)}"
    return line, build_warning(build, nvidia_smi_names(), torch.cuda.is_available())
