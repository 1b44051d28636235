"""Which packages the GPU check needs that the GPU machine lacks, pinned to the versions the tests ran with.

The machine this project is lent for its GPU check has torch and the common scientific stack but not the
cache's own libraries (zarr, numcodecs, webdataset), and it reaches no package index. ``bench/gpu_wheels.sh``
downloads wheels of exactly what this module lists, so that what runs there is what the test suite ran here:
the versions are read from this interpreter's installed distributions (the project's venv), not from a
hand-kept list that could drift from them.

    .venv/bin/python bench/gpu_deps.py [--python-version 3.12]   # prints NAME==VERSION, one a line

The same closure builds the stand-in for that machine in the offline test (``tests/test_gpu_offline.py``).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import platform
import re

from packaging.markers import default_environment
from packaging.requirements import Requirement

# What the GPU machine has installed (with their own dependencies), as the issue that lent it describes.
MACHINE_HAS = (
    "torch",
    "torchvision",
    "timm",
    "numpy",
    "pillow",
    "pyyaml",
    "typer",
    "rich",
    "fsspec",
    "matplotlib",
    "tensorboard",
    "scikit-learn",
)
# What the check imports beyond that: the cache store and the shard reader.
CHECK_NEEDS = ("zarr", "numcodecs", "webdataset")


def normalize(name: str) -> str:
    """PEP 503 name: ``Google_CRC32C`` and ``google-crc32c`` are one distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requires(name: str, extras: frozenset[str], env: dict[str, str]) -> list[tuple[str, frozenset[str]]]:
    """The distributions (with their extras) ``name`` needs at run time under ``env``, with ``extras`` asked
    for (torch asks for extras of ``cuda-toolkit``: the CUDA libraries it loads at import)."""
    out = []
    for text in md.requires(name) or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in ("", *extras)):
            out.append((normalize(req.name), frozenset(req.extras)))
    return out


def closure(names: tuple[str, ...] | list[str], python_version: str | None = None) -> dict[str, str]:
    """``{name: installed version}`` of ``names`` and everything they need, transitively.

    Environment markers are evaluated for ``python_version`` (the target machine's Python, default this
    one's), so a dependency only some Pythons need is counted for the right one.

    Raises:
        SystemExit: a needed distribution is not installed here (the pins could not be read).
    """
    env = dict(default_environment())
    if python_version:
        env.update(python_version=python_version, python_full_version=f"{python_version}.0")
    found: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(normalize(n), frozenset()) for n in names]
    while todo:
        item = todo.pop()
        if item in seen:
            continue
        seen.add(item)
        name, extras = item
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            raise SystemExit(
                f"error: {name} is needed but not installed in this Python ({platform.python_version()}): "
                "run this with the project's venv (.venv/bin/python, made by scripts/setup.sh)"
            ) from None
        todo += _requires(name, extras, env)
    return found


def missing_on_machine(python_version: str | None = None) -> dict[str, str]:
    """What the check needs that the GPU machine lacks: the check's closure minus the machine's."""
    has = closure(MACHINE_HAS, python_version)
    return {n: v for n, v in sorted(closure(CHECK_NEEDS, python_version).items()) if n not in has}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python (X.Y)")
    args = p.parse_args()
    for name, version in missing_on_machine(args.python_version).items():
        print(f"{name}=={version}")


if __name__ == "__main__":
    main()
