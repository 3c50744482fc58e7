"""Which PyTorch build to install on this machine: the launchers ask this before the first install.

    python lora_studio/torch_build.py          prints the pip arguments on stdout, the reason on stderr

Run by ``launch.sh`` / ``launch.bat`` with the new virtual environment's Python, before anything else is
installed, so it uses the standard library only. The choice:

- ``LORA_STUDIO_TORCH`` set: exactly that (the way to override everything below).
- an NVIDIA GPU (``nvidia-smi`` answers): the CUDA build that matches the driver's CUDA version
  (PyTorch's wheel index ``cu130``, ``cu128`` or ``cu126``); a driver older than CUDA 12 gets the CPU build
  and a request to update the driver;
- Linux with an AMD GPU (``rocminfo`` or ``rocm-smi`` answers): the ROCm build;
- macOS: the default build from PyPI (it uses Apple's GPU through MPS);
- otherwise: the CPU build (a small download; PyPI's default on Linux is a multi-GB CUDA build).

``choose_torch`` takes the command outputs as arguments, so the choice is tested with fake outputs.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

# The PyTorch releases LoRA Studio is tested with (the lock of tested versions leaves torch out: the
# build depends on the machine). Raise the upper bound on purpose, after the suite passed with it.
TORCH_SPEC = "torch>=2.4,<2.14"
INDEX = "https://download.pytorch.org/whl/"
# (lowest driver CUDA version, wheel index tag), newest first.
CUDA_BUILDS = ((13, 0, "cu130"), (12, 8, "cu128"), (12, 0, "cu126"))
ROCM_BUILD = "rocm6.4"
OVERRIDE_HINT = ('To choose another build, set LORA_STUDIO_TORCH before the first run (or before "repair"), '
                 'e.g. LORA_STUDIO_TORCH="torch --index-url https://download.pytorch.org/whl/cu128".')


@dataclass(frozen=True)
class TorchChoice:
    pip_args: str   # what follows "pip install"
    reason: str     # one sentence for the person watching the install


def cuda_version(nvidia_smi_output: str) -> tuple[int, int] | None:
    """The driver's CUDA version from ``nvidia-smi``'s banner ("CUDA Version: 12.4"), or None."""
    match = re.search(r"CUDA Version\s*:\s*(\d+)\.(\d+)", nvidia_smi_output or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def gpu_names(nvidia_smi_output: str) -> list[str]:
    """GPU names from ``nvidia-smi -L`` lines ("GPU 0: NVIDIA GeForce RTX 4090 (UUID: GPU-...)")."""
    return re.findall(r"^GPU \d+: (.+?) \(UUID", nvidia_smi_output or "", flags=re.M)


def choose_torch(system: str, *, nvidia_smi: str | None = None, rocm: str | None = None,
                 override: str | None = None) -> TorchChoice:
    """The build for a machine: ``system`` as ``platform.system()`` says, the output of ``nvidia-smi`` (and
    ``nvidia-smi -L``) and of ``rocminfo``/``rocm-smi`` (None when the command is missing or failed),
    ``override`` = LORA_STUDIO_TORCH."""
    if override and override.strip():
        return TorchChoice(override.strip(), f"LORA_STUDIO_TORCH is set: installing '{override.strip()}'.")
    if system == "Darwin":
        return TorchChoice(TORCH_SPEC, "macOS: the standard PyTorch build from PyPI, which uses the Apple GPU (MPS) "
                                       "where there is one.")
    if nvidia_smi is not None:
        version = cuda_version(nvidia_smi)
        names = ", ".join(gpu_names(nvidia_smi)) or "an NVIDIA GPU"
        if version is None:
            return TorchChoice(f"{TORCH_SPEC} --index-url {INDEX}cu126",
                               f"Found {names}, but nvidia-smi did not say its CUDA version: installing the CUDA 12.6 "
                               "build of PyTorch.")
        for major, minor, tag in CUDA_BUILDS:
            if version >= (major, minor):
                return TorchChoice(f"{TORCH_SPEC} --index-url {INDEX}{tag}",
                                   f"Found {names} with a driver for CUDA {version[0]}.{version[1]}: installing "
                                   f"PyTorch's CUDA build {tag}.")
        return TorchChoice(f"{TORCH_SPEC} --index-url {INDEX}cpu",
                           f"Found {names}, but its driver only supports CUDA {version[0]}.{version[1]}, older than "
                           "current PyTorch needs (CUDA 12). Installing the CPU build for now: update the NVIDIA "
                           "driver (nvidia.com/drivers), then run the launcher with 'repair' to get the GPU build.")
    if system == "Linux" and rocm is not None:
        return TorchChoice(f"{TORCH_SPEC} --index-url {INDEX}{ROCM_BUILD}",
                           f"Found an AMD GPU (ROCm): installing PyTorch's ROCm build {ROCM_BUILD}.")
    return TorchChoice(f"{TORCH_SPEC} --index-url {INDEX}cpu",
                       "No NVIDIA or AMD GPU found: installing the CPU build of PyTorch (a small download). Training "
                       "real models needs a GPU.")


def _run(command: list[str]) -> str | None:
    """A command's output, or None when it is missing or fails."""
    if shutil.which(command[0]) is None:
        return None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def detect() -> TorchChoice:
    """The choice for this machine."""
    system = platform.system()
    nvidia = _run(["nvidia-smi"]) if system != "Darwin" else None
    if nvidia is not None:
        nvidia += "\n" + (_run(["nvidia-smi", "-L"]) or "")
    rocm = None
    if system == "Linux" and nvidia is None:
        rocm = _run(["rocminfo"]) or _run(["rocm-smi"])
    return choose_torch(system, nvidia_smi=nvidia, rocm=rocm, override=os.environ.get("LORA_STUDIO_TORCH"))


def main() -> int:
    choice = detect()
    sys.stderr.write(f"{choice.reason}\n")
    if not os.environ.get("LORA_STUDIO_TORCH"):
        sys.stderr.write(f"{OVERRIDE_HINT}\n")
    sys.stdout.write(choice.pip_args + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
