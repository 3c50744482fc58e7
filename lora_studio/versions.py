"""Is the installation whole? Installed package versions checked against each other, at start-up.

A fresh install resolves to whatever was published that morning, and one day a release stops working with
another (transformers 5.24 needs peft >= 0.22, which did not exist yet). Then a creator would get a traceback
halfway through training. Instead the app and the command line check at start-up and refuse a broken
combination with one sentence that names the packages, their versions and the repair command.

What is checked (package metadata and one source constant; nothing heavy is imported):
- every requirement of ``requirements.txt`` is installed in its range;
- the declared requirements of the packages LoRA Studio uses (its dependency tree), as ``pip check`` does;
- the peft version transformers and diffusers need for their PEFT integration (an optional dependency that
  their metadata does not declare: its floor is a constant in their source, ``MIN_PEFT_VERSION``).

``LORA_STUDIO_SKIP_INSTALL_CHECK=1`` skips the check (for people who know why).
"""

from __future__ import annotations

import os
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Iterable, Mapping

from .errors import StudioError

REQUIREMENTS = Path(__file__).resolve().parent.parent / "requirements.txt"
# The versions the test suite passed with (a pip constraints file the launchers install with).
LOCK = REQUIREMENTS.with_name("requirements.lock")
# Not in the lock: torch (its build depends on the machine: CUDA, ROCm, CPU) and what only torch needs, and
# the installer's own tools.
LOCK_EXCLUDED = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*|sympy|mpmath|networkx|pip|setuptools|wheel)$")
# Where a package keeps the lowest peft its PEFT integration accepts (a constant, not metadata).
PEFT_FLOOR_SOURCES = {"transformers": "transformers/integrations/peft.py", "diffusers": "diffusers/utils/constants.py"}
SKIP_ENV = "LORA_STUDIO_SKIP_INSTALL_CHECK"


class InstallError(StudioError):
    """Installed packages that do not work together (or are missing)."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def repair_command() -> str:
    return "launch.bat repair" if sys.platform == "win32" else "./launch.sh repair"


def _installed() -> dict[str, tuple[str, list[str]]]:
    """``{canonical name: (version, declared requirements)}``, each METADATA file parsed once (the first
    distribution of a name on ``sys.path`` wins)."""
    out: dict[str, tuple[str, list[str]]] = {}
    for dist in metadata.distributions():
        meta = dist.metadata
        name = meta["Name"]
        if name and canonical(name) not in out:
            out[canonical(name)] = (meta["Version"], meta.get_all("Requires-Dist") or [])
    return out


def installed_versions() -> dict[str, str]:
    """``{canonical name: version}`` of the installed distributions."""
    return {name: version for name, (version, _) in _installed().items()}


def _version_ok(version: str, specifier) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        return specifier.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return True  # a local build with an odd version string: not ours to judge


def requirement_problems(requirements: Iterable[str], installed: Mapping[str, str]) -> list[str]:
    """Requirement lines (``name>=1.0,<2``, markers allowed) that the installed versions do not meet."""
    from packaging.requirements import InvalidRequirement, Requirement

    problems = []
    for line in requirements:
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.marker is not None and not req.marker.evaluate():
            continue
        have = installed.get(canonical(req.name))
        if have is None:
            problems.append(f"{req.name} is not installed (LoRA Studio needs {req.name}{req.specifier})")
        elif req.specifier and not _version_ok(have, req.specifier):
            problems.append(f"{req.name} {have} is installed, but LoRA Studio needs {req.name}{req.specifier}")
    return problems


def dependency_problems(roots: Iterable[str], installed: Mapping[str, str],
                        requires: Mapping[str, list[str]]) -> list[str]:
    """Declared requirements (``requires``: name -> Requires-Dist lines) that break, among the installed
    packages reachable from ``roots`` (as ``pip check`` does)."""
    from packaging.requirements import InvalidRequirement, Requirement

    problems, seen, todo = [], set(), [canonical(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen or name not in installed:
            continue
        seen.add(name)
        for text in requires.get(name, []):
            try:
                req = Requirement(text)
            except InvalidRequirement:
                continue
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue  # an optional extra, or another platform
            dep = canonical(req.name)
            todo.append(dep)
            have = installed.get(dep)
            if have is not None and req.specifier and not _version_ok(have, req.specifier):
                problems.append(f"{name} {installed[name]} needs {req.name}{req.specifier}, but {req.name} {have} "
                                "is installed")
    return problems


def peft_floor(package: str) -> str | None:
    """The ``MIN_PEFT_VERSION`` in an installed package's source, read as text (no import)."""
    relative = PEFT_FLOOR_SOURCES.get(package)
    if relative is None:
        return None
    try:
        source = Path(metadata.distribution(package).locate_file(relative)).read_text(encoding="utf-8")
    except (metadata.PackageNotFoundError, OSError):
        return None
    match = re.search(r'^MIN_PEFT_VERSION\s*=\s*["\']([^"\']+)["\']', source, flags=re.M)
    return match.group(1) if match else None


def peft_floor_problems(floors: Mapping[str, str | None], installed: Mapping[str, str]) -> list[str]:
    """``floors`` = {package: the lowest peft it accepts}; the packages whose floor the installed peft is under."""
    from packaging.specifiers import SpecifierSet

    peft = installed.get("peft")
    problems = []
    for package, floor in floors.items():
        if floor and peft is not None and package in installed and not _version_ok(peft, SpecifierSet(f">={floor}")):
            problems.append(f"{package} {installed[package]} needs peft >= {floor}, but peft {peft} is installed")
    return problems


def install_problems(installed: Mapping[str, str] | None = None,
                     requirements: Iterable[str] | None = None) -> list[str]:
    """Every problem found, as short clauses (empty when the installation is whole)."""
    found = _installed()
    installed = {n: v for n, (v, _) in found.items()} if installed is None else installed
    if requirements is None:
        try:
            requirements = REQUIREMENTS.read_text(encoding="utf-8").splitlines()
        except OSError:
            requirements = []
    requirements = list(requirements)
    problems = requirement_problems(requirements, installed)
    roots = [line.split("#", 1)[0].split(";", 1)[0].strip() for line in requirements]
    roots = [re.split(r"[<>=!~\[ ]", r, maxsplit=1)[0] for r in roots if r and not r.startswith("-")]
    problems += dependency_problems(roots, installed, {n: r for n, (_, r) in found.items()})
    problems += peft_floor_problems({p: peft_floor(p) for p in PEFT_FLOOR_SOURCES}, installed)
    return list(dict.fromkeys(problems))


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """``{canonical name: version}`` from a lock file of ``name==version`` lines."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[canonical(name.strip())] = version.strip()
    return out


def lock_text(installed: Mapping[str, str], header: str) -> str:
    """A lock file of the installed versions (``name==version``, sorted), torch and its own tools left out."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines += [f"{name}=={version}" for name, version in sorted(installed.items()) if not LOCK_EXCLUDED.match(name)]
    return "\n".join(lines) + "\n"


def lock_differences(installed: Mapping[str, str], locked: Mapping[str, str]) -> list[str]:
    """How the installed packages differ from the lock (missing, other version, not in the lock)."""
    out = []
    for name, version in sorted(locked.items()):
        have = installed.get(name)
        if have is None:
            out.append(f"{name} {version} is in the lock but not installed")
        elif have != version:
            out.append(f"{name} {have} is installed, the lock has {version}")
    for name in sorted(set(installed) - set(locked)):
        if not LOCK_EXCLUDED.match(name):
            out.append(f"{name} {installed[name]} is installed but not in the lock")
    return out


def install_message(problems: list[str]) -> str:
    """One sentence for the terminal: what does not fit, and the command that repairs the install."""
    return (f"The installed packages do not work together: {'; '.join(problems)}. Repair the installation with "
            f"'{repair_command()}' (it rebuilds .venv from the versions LoRA Studio was tested with), or delete the "
            ".venv folder and start again.")


def require_working_install() -> None:
    """Raise ``InstallError`` with ``install_message`` when something does not fit (unless skipped)."""
    if os.environ.get(SKIP_ENV) == "1":
        return
    problems = install_problems()
    if problems:
        raise InstallError(install_message(problems))
