#!/usr/bin/env python3
"""Refresh requirements.lock on purpose: the newest versions requirements.txt allows, kept only if the tests pass.

    python .ci/refresh_lock.py                 # fresh venv, newest allowed versions, fast tests, new lock
    python .ci/refresh_lock.py --all-tests     # the whole suite instead of the fast subset

1. creates a fresh virtual environment in a temporary folder;
2. installs torch ($LORA_STUDIO_TORCH, else the build lora_studio/torch_build.py picks) and then
   requirements-dev.txt WITHOUT the lock, so pip takes the newest versions the ranges allow;
3. runs the fast tests there (``-m "not slow"``);
4. only if they pass, writes requirements.lock from that environment and prints what changed.

When the tests fail, the lock is left as it is and the changed versions are printed: the drift is found here,
by a developer, never by a creator on a fresh install. Then add an upper bound to requirements.txt (with a
comment saying why) and run this again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lora_studio.versions import LOCK, lock_text, read_lock  # noqa: E402


def run(cmd: list[str], **kwargs) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def installed_in(python: Path) -> dict[str, str]:
    code = ("import json, re; from importlib import metadata; "
            "print(json.dumps({re.sub(r'[-_.]+', '-', d.metadata['Name']).lower(): d.version "
            "for d in metadata.distributions()}))")
    return json.loads(subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True).stdout)


def changes(old: dict[str, str], new: dict[str, str]) -> list[str]:
    lines = []
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            lines.append(f"  {name}: {old.get(name, '-')} -> {new.get(name, '-')}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all-tests", action="store_true", help="run the whole suite, not only -m 'not slow'")
    parser.add_argument("--venv", help="use (and keep) this folder for the fresh environment")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lora-studio-lock-") as tmp:
        venv = Path(args.venv or Path(tmp) / "venv")
        run([sys.executable, "-m", "venv", "--clear", str(venv)])
        python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
        torch_args = subprocess.run([str(python), str(ROOT / "lora_studio" / "torch_build.py")], check=True,
                                    capture_output=True, text=True).stdout.split()
        run([str(python), "-m", "pip", "install", "-q", *torch_args])
        run([str(python), "-m", "pip", "install", "-q", "-r", str(ROOT / "requirements-dev.txt")])
        new = installed_in(python)
        old = read_lock() if LOCK.is_file() else {}
        env = dict(os.environ, LORA_STUDIO_REFRESHING_LOCK="1")
        tests = [str(python), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
        if not args.all_tests:
            tests += ["-m", "not slow"]
        print("+", " ".join(tests), flush=True)
        if subprocess.run(tests, cwd=ROOT, env=env).returncode != 0:
            print("\nThe tests FAILED with the newest allowed versions; requirements.lock is unchanged.")
            print("Versions that differ from the lock (one of them is the cause):")
            print("\n".join(changes(old, new)) or "  none")
            return 1
        header = (f"Versions LoRA Studio's test suite passed with: a pip constraints file (pip install -r "
                  f"requirements.txt -c requirements.lock).\nWritten by .ci/refresh_lock.py on "
                  f"{time.strftime('%Y-%m-%d')} with Python {sys.version_info.major}.{sys.version_info.minor} on "
                  f"{sys.platform}. Left out: torch and what only torch needs\n(the launchers pick torch's build "
                  "for the machine), pip, setuptools, wheel. Do not edit by hand: run .ci/refresh_lock.py.")
        LOCK.write_text(lock_text(new, header), encoding="utf-8")
        print(f"\nThe tests passed; {LOCK.name} written. Changes:")
        print("\n".join(changes(old, read_lock())) or "  none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
