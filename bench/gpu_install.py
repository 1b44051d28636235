"""Install the GPU check's missing packages from a folder of wheels, offline (``bench/gpu_check.sh --wheels``).

    python3 bench/gpu_install.py WHEELS TARGET

``WHEELS`` is a folder made by ``bench/gpu_wheels.sh``: wheels and a ``requirements.txt`` of the pins
(NAME==VERSION). Each pin's wheel is found in it and checked against this interpreter before anything is
installed, so a missing or wrong wheel is one line that names it, not pip's resolver report. They are then
installed with ``pip install --no-index --no-deps --target TARGET`` (no index, no dependencies: nothing is
fetched, and the machine's own torch, numpy... stay what they are), or unpacked into ``TARGET`` where this
Python has no pip (a wheel is a zip of what goes into site-packages). Standard library only: it runs before
anything the check needs can be imported.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

REMEDY = (
    "run `bash bench/gpu_wheels.sh {folder}{pyv}` where the package registries are reachable, and carry {folder} here"
)


class WheelError(Exception):
    """A wheel the check needs is missing from the folder or does not fit this Python."""


def _pyv_flag() -> str:
    pyv = f"{sys.version_info.major}.{sys.version_info.minor}"
    return "" if pyv == "3.12" else f" --python-version {pyv}"


def _wheel_name(name: str) -> str:
    """How a wheel's file name spells a distribution (``google-crc32c`` -> ``google_crc32c``)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def pins(folder: Path) -> list[tuple[str, str]]:
    """``(name, version)`` of every line of ``folder/requirements.txt``."""
    req = folder / "requirements.txt"
    if not folder.is_dir() or not req.is_file():
        what = "is not a folder" if not folder.is_dir() else "has no requirements.txt"
        raise WheelError(f"WHEELS={folder} {what}: " + REMEDY.format(folder=folder, pyv=_pyv_flag()))
    out = []
    for line in req.read_text().splitlines():
        name, sep, version = line.strip().partition("==")
        if line.strip() and not line.startswith("#"):
            if not sep:
                raise WheelError(f"{req}: {line.strip()!r} is not NAME==VERSION")
            out.append((name.strip(), version.strip()))
    return out


def fits(wheel: Path) -> bool:
    """Whether this CPython can import ``wheel``: a pure wheel, or one built for this minor version."""
    python_tags, abi_tags = wheel.stem.split("-")[-3:-1]
    here = f"cp{sys.version_info.major}{sys.version_info.minor}"
    if "none" in abi_tags.split("."):
        return any(t.startswith("py3") or t == here for t in python_tags.split("."))
    return here in python_tags.split(".") or "abi3" in abi_tags.split(".")


def wheels_for(folder: Path) -> list[Path]:
    """The wheel of each pin, checked to exist and to fit this Python."""
    chosen = []
    for name, version in pins(folder):
        prefix = f"{_wheel_name(name)}-{version}-"
        found = [w for w in sorted(folder.glob("*.whl")) if w.name.lower().startswith(prefix)]
        found.sort(key=lambda w: not fits(w))  # a folder may hold wheels for several Pythons
        if not found:
            remedy = REMEDY.format(folder=folder, pyv=_pyv_flag())
            raise WheelError(f"WHEELS={folder} has no wheel of {name}=={version}: {remedy}")
        if not fits(found[0]):
            raise WheelError(
                f"WHEELS={folder}: {found[0].name} is not for this Python ({sys.version.split()[0]}): "
                + REMEDY.format(folder=folder, pyv=_pyv_flag())
            )
        chosen.append(found[0])
    return chosen


def _packaging() -> Any:
    """``packaging`` (matplotlib's dependency), else pip's own copy of it, else None."""
    for name in ("packaging", "pip._vendor.packaging"):
        try:
            return (importlib.import_module(f"{name}.requirements"), importlib.import_module(f"{name}.version"))
        except ImportError:
            continue
    return None


def _requires(wheel: Path) -> list[str]:
    """The ``Requires-Dist`` lines of a wheel's metadata."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    return [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:")]


def unmet(wheels: list[Path]) -> list[str]:
    """What the wheels ask of this Python's own packages and it does not have (``--no-deps`` installs them
    anyway; these lines say why an import may fail afterwards). Versions are compared where ``packaging``
    (or pip's copy of it) is importable; otherwise only presence is checked."""
    found = _packaging()
    ours = {_wheel_name(w.name.split("-")[0]) for w in wheels}
    out = []
    for w in wheels:
        for text in _requires(w):
            name = re.match(r"[A-Za-z0-9._-]+", text).group(0)  # type: ignore[union-attr]
            req = found[0].Requirement(text) if found else None
            optional = req.marker and not req.marker.evaluate({"extra": ""}) if req else "extra ==" in text
            if _wheel_name(name) in ours or optional:
                continue
            try:
                have = md.version(name)
            except md.PackageNotFoundError:
                out.append(f"{w.name.split('-')[0]} needs {text}, which this Python lacks")
                continue
            if req and req.specifier and not req.specifier.contains(found[1].Version(have), prereleases=True):
                out.append(f"{w.name.split('-')[0]} asks for {req}; this Python has {name} {have}")
    return out


def install(wheels: list[Path], target: Path) -> str:
    """Install ``wheels`` into ``target`` with pip (offline, no dependencies), else unpack them there."""
    target.mkdir(parents=True, exist_ok=True)
    if importlib.util.find_spec("pip") is None:
        for w in wheels:
            with zipfile.ZipFile(w) as z:
                z.extractall(target)
        return "unpacked (this Python has no pip)"
    # No configuration or PIP_* variables: an index or find-links of this machine's pip must not join in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {"PIP_CONFIG_FILE": os.devnull}
    # --target also spares a distribution's system Python pip's "externally managed" refusal (PEP 668).
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-cache-dir", "--quiet"]
    cmd += ["--disable-pip-version-check", "--target", str(target), *map(str, wheels)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise WheelError(f"pip could not install the wheels of {wheels[0].parent} into {target}: {last}")
    return "pip install --no-index --no-deps"


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: python3 bench/gpu_install.py WHEELS TARGET")
    folder, target = Path(sys.argv[1]), Path(sys.argv[2])
    try:
        wheels = wheels_for(folder)
        how = install(wheels, target)
    except WheelError as e:
        sys.exit(f"error: {e}")
    for line in unmet(wheels):
        print(f"warning: {line} (if the check cannot import it, this is why)")
    print(f"installed {len(wheels)} packages from {folder} into {target} ({how}): {', '.join(w.name for w in wheels)}")


if __name__ == "__main__":
    main()
