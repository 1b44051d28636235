"""The presets (``configs/*.yaml``), wherever stillroom is installed from.

``configs/`` is installed as the package ``pipeline.presets`` (see ``pyproject.toml``), so a wheel
carries the presets the demo needs at run time; a source checkout that is not installed reads them
from ``configs/`` next to ``pipeline/``.
"""

from __future__ import annotations

import importlib.resources
import shutil
from pathlib import Path

from pipeline.errors import ConfigError, StorageError
from pipeline.files import os_reason, writable_folder

_SOURCE_TREE = Path(__file__).resolve().parents[1] / "configs"


def _folder() -> Path:
    try:
        folder = Path(str(importlib.resources.files("pipeline.presets")))
    except ModuleNotFoundError:
        folder = _SOURCE_TREE
    return folder if folder.is_dir() else _SOURCE_TREE


def preset_names() -> list[str]:
    """The presets' file names (``demo.yaml``, ``deit_small.yaml``...)."""
    return sorted(p.name for p in _folder().glob("*.yaml"))


def preset_path(name: str) -> Path:
    """The file of preset ``name`` (with or without ``.yaml``)."""
    file = name if name.endswith(".yaml") else f"{name}.yaml"
    path = _folder() / file
    if not path.is_file():
        raise ConfigError(f"no preset named {name!r}; presets: {', '.join(preset_names())}")
    return path


def copy_presets(dest: str) -> list[str]:
    """Copy every preset into the folder ``dest`` (created); existing files of the same name are refused."""
    out = Path(dest)
    writable_folder(dest, "--copy-to")
    clashes = [n for n in preset_names() if (out / n).exists()]
    if clashes:
        raise ConfigError(f"{dest!r} already holds {', '.join(clashes)}; choose an empty folder")
    for name in preset_names():
        try:
            shutil.copyfile(_folder() / name, out / name)
        except OSError as e:
            raise StorageError(f"cannot write {str(out / name)!r}: {os_reason(e)}") from None
    return preset_names()
