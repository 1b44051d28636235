"""Plugins: Python modules named in ``STILLROOM_PLUGINS`` (comma separated), imported before a command runs.

The hook for what stillroom does not ship: a teacher or student family that is not in timm (a plugin
registers it with timm's own ``@timm.models.register_model``, and ``--teacher``/``--model`` then name it),
or a storage backend (a plugin calls :func:`pipeline.storage.register_backend`). DataLoader workers are
forked from a process that already imported them.
"""

from __future__ import annotations

import importlib
import os

from pipeline.errors import ConfigError

ENV = "STILLROOM_PLUGINS"


def load_plugins(value: str | None = None) -> list[str]:
    """Import every module ``STILLROOM_PLUGINS`` names (or ``value``); returns their names."""
    names = [n.strip() for n in (os.environ.get(ENV, "") if value is None else value).split(",") if n.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"${ENV}: cannot import plugin {name!r} ({e}); is it on PYTHONPATH?") from e
    return names
