"""The install: the lock of tested versions, the start-up check of package versions, the PyTorch build choice,
and the device line with its warning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_studio import hardware, torch_build, versions

ROOT = Path(__file__).resolve().parents[1]


REFRESHING = pytest.mark.skipif(os.environ.get("LORA_STUDIO_REFRESHING_LOCK") == "1",
                                reason=".ci/refresh_lock.py is trying newer versions; it writes the lock after the "
                                       "tests pass")


@REFRESHING
def test_installed_versions_are_the_locked_ones():
    """CI installs from requirements.lock: this proves the suite ran on exactly those versions."""
    differences = versions.lock_differences(versions.installed_versions(), versions.read_lock())
    assert not differences, ("The installed packages differ from requirements.lock (install with './launch.sh test', "
                             "or refresh the lock with .ci/refresh_lock.py):\n" + "\n".join(differences))


@REFRESHING
def test_lock_pins_no_torch_and_fits_the_requirement_ranges():
    locked = versions.read_lock()
    assert locked and not any(versions.LOCK_EXCLUDED.match(name) for name in locked)
    requirements = versions.REQUIREMENTS.read_text(encoding="utf-8").splitlines()
    assert versions.requirement_problems(requirements, locked) == []
    # the launchers install with the lock as constraints, and pick torch separately
    for launcher in ("launch.sh", "launch.bat"):
        text = (ROOT / launcher).read_text(encoding="utf-8")
        assert "-c requirements.lock" in text or '-c "$LOCK"' in text, launcher
        assert "torch_build.py" in text and "repair" in text, launcher


def test_the_installation_here_is_whole():
    assert versions.install_problems() == []


def test_a_faked_broken_pair_is_named_with_the_repair_command():
    installed = {"transformers": "5.24.0", "peft": "0.21.2", "diffusers": "0.42.1"}
    problems = versions.peft_floor_problems({"transformers": "0.22.0", "diffusers": "0.17.0"}, installed)
    assert problems == ["transformers 5.24.0 needs peft >= 0.22.0, but peft 0.21.2 is installed"]
    message = versions.install_message(problems)
    assert "transformers 5.24.0" in message and "peft 0.21.2" in message and "launch.sh repair" in message
    assert versions.requirement_problems(["transformers>=5.0,<5.24", "gradio>=6.0"], installed) == [
        "transformers 5.24.0 is installed, but LoRA Studio needs transformers<5.24,>=5.0",
        "gradio is not installed (LoRA Studio needs gradio>=6.0)"]


def test_peft_floor_is_read_from_the_installed_source():
    floor = versions.peft_floor("transformers")
    assert floor is not None and floor[0].isdigit()


@pytest.fixture()
def fake_old_peft(tmp_path) -> dict[str, str]:
    """An environment where Python finds metadata of peft 0.1.0 before the real one (as a broken install would)."""
    info = tmp_path / "fake" / "peft-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: peft\nVersion: 0.1.0\n", encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "fake"), str(ROOT)]))
    env.pop(versions.SKIP_ENV, None)
    return env


def test_cli_and_app_refuse_a_broken_install_with_one_sentence(fake_old_peft, tmp_path):
    for cmd in ([sys.executable, "-m", "lora_studio", "train", "--config", str(tmp_path / "x.yaml")],
                [sys.executable, str(ROOT / "app.py"), "--no-browser", "--outputs", str(tmp_path / "out")]):
        done = subprocess.run(cmd, env=fake_old_peft, capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert done.returncode != 0, cmd
        assert "Traceback" not in done.stderr
        error = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and "peft 0.1.0" in error[0] and "launch.sh repair" in error[0], done.stderr


@pytest.mark.slow
def test_doctor_reports_a_broken_install(fake_old_peft):
    done = subprocess.run([sys.executable, "-m", "lora_studio", "doctor", "--steps", "0"], env=fake_old_peft,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 1
    assert "PROBLEM:" in done.stdout and "peft 0.1.0" in done.stdout and "Device: CPU only" in done.stdout


# --- the PyTorch build the launchers install -----------------------------------------------------------------
SMI_HEADER = """+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 570.86.10              Driver Version: 570.86.10      CUDA Version: {cuda}     |
|-----------------------------------------+------------------------+----------------------+
GPU 0: NVIDIA GeForce RTX 4090 (UUID: GPU-1234)
"""


@pytest.mark.parametrize("cuda, tag", [("13.1", "cu130"), ("12.8", "cu128"), ("12.9", "cu128"), ("12.4", "cu126"),
                                       ("12.0", "cu126")])
def test_an_nvidia_gpu_gets_the_cuda_build_of_its_driver(cuda, tag):
    for system in ("Windows", "Linux"):
        choice = torch_build.choose_torch(system, nvidia_smi=SMI_HEADER.format(cuda=cuda))
        assert choice.pip_args.endswith(f"--index-url https://download.pytorch.org/whl/{tag}")
        assert "NVIDIA GeForce RTX 4090" in choice.reason and cuda in choice.reason


def test_an_old_driver_gets_the_cpu_build_and_advice():
    choice = torch_build.choose_torch("Windows", nvidia_smi=SMI_HEADER.format(cuda="11.8"))
    assert choice.pip_args.endswith("/whl/cpu") and "update the NVIDIA driver" in choice.reason


def test_amd_mac_cpu_and_the_override():
    rocm = torch_build.choose_torch("Linux", rocm="ROCk module is loaded\nAgent 2 gfx1100")
    assert "/whl/rocm" in rocm.pip_args and "AMD" in rocm.reason
    assert "/whl/rocm" not in torch_build.choose_torch("Windows", rocm="x").pip_args  # ROCm wheels: Linux only
    mac = torch_build.choose_torch("Darwin", nvidia_smi=None)
    assert mac.pip_args == torch_build.TORCH_SPEC and "MPS" in mac.reason
    cpu = torch_build.choose_torch("Linux")
    assert cpu.pip_args.endswith("/whl/cpu") and "CPU build" in cpu.reason
    own = torch_build.choose_torch("Linux", nvidia_smi=SMI_HEADER.format(cuda="12.8"), override="torch==2.13.0")
    assert own.pip_args == "torch==2.13.0" and "LORA_STUDIO_TORCH" in own.reason


def test_the_script_prints_pip_arguments_and_the_reason(tmp_path):
    env = dict(os.environ, LORA_STUDIO_TORCH="torch==2.13.0", PATH=str(tmp_path))  # no nvidia-smi on this PATH
    done = subprocess.run([sys.executable, str(ROOT / "lora_studio" / "torch_build.py")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert done.stdout.strip() == "torch==2.13.0" and "LORA_STUDIO_TORCH is set" in done.stderr


def test_a_fake_nvidia_smi_on_the_path_is_found(tmp_path):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\nif [ \"$1\" = \"-L\" ]; then echo 'GPU 0: NVIDIA RTX A4000 (UUID: GPU-1)'; "
                   "else echo 'Driver Version: 560.0  CUDA Version: 12.6'; fi\n", encoding="utf-8")
    smi.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    env.pop("LORA_STUDIO_TORCH", None)
    done = subprocess.run([sys.executable, str(ROOT / "lora_studio" / "torch_build.py")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip().endswith("/whl/cu126") and "NVIDIA RTX A4000" in done.stderr


# --- the device the engine uses ----------------------------------------------------------------------------------
def test_cpu_only_torch_beside_an_nvidia_gpu_is_warned_with_the_fix():
    cpu_build = {"version": "2.13.0+cpu", "cuda": None, "hip": None, "mps": False}
    warning = hardware.build_warning(cpu_build, ["NVIDIA GeForce RTX 3060"], cuda_usable=False)
    assert "NVIDIA GeForce RTX 3060" in warning and "CPU-only" in warning and "launch.sh repair" in warning
    cuda_build = dict(cpu_build, cuda="12.8")
    assert "driver" in hardware.build_warning(cuda_build, ["NVIDIA GeForce RTX 3060"], cuda_usable=False)
    assert hardware.build_warning(cuda_build, ["NVIDIA GeForce RTX 3060"], cuda_usable=True) is None
    assert hardware.build_warning(cpu_build, None, cuda_usable=False) is None


@pytest.mark.slow
def test_doctor_warns_with_a_fake_gpu_and_a_cpu_only_torch(tmp_path):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA GeForce RTX 3060 (UUID: GPU-9)'\n", encoding="utf-8")
    smi.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run([sys.executable, "-m", "lora_studio", "doctor", "--steps", "0"], env=env,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert "WARNING: This computer has NVIDIA GeForce RTX 3060" in done.stdout
    assert "CPU-only build" in done.stdout


def test_precision_follows_the_device():
    assert hardware.adapt_precision("fp16", "cuda") == ("fp16", None)
    precision, note = hardware.adapt_precision("fp16", "mps", bf16_ok=True)
    assert precision == "bf16" and "MPS" in note
    assert hardware.adapt_precision("bf16", "mps", bf16_ok=True) == ("bf16", None)
    precision, note = hardware.adapt_precision("bf16", "mps", bf16_ok=False)
    assert precision == "no" and "macOS 14" in note
    assert hardware.adapt_precision("fp16", "cpu")[0] == "no"
    assert hardware.adapt_precision("bf16", "cpu", cpu_check=True) == ("bf16", None)
    assert hardware.adapt_precision("no", "mps") == ("no", None)
