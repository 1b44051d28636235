"""Plugins: Python modules named in ``STILLROOM_PLUGINS`` (comma separated), imported before a command runs.

The hook for what stillroom does not ship: a teacher or student family that is not in timm (a plugin
registers it with timm's own ``@timm.models.register_model``, and ``--teacher``/``--model`` then name it),
or a storage backend (a plugin calls :func:`pipeline.storage.register_backend`). DataLoader workers are
forked from a process that already imported them.
"""

from __future__ import annotations

import importlib
import os
import traceback

from pipeline.errors import ConfigError

ENV = "STILLROOM_PLUGINS"


def load_plugins(value: str | None = None) -> list[str]:
    """Import every module ``STILLROOM_PLUGINS`` names (or ``value``); returns their names."""
    names = [n.strip() for n in (os.environ.get(ENV, "") if value is None else value).split(",") if n.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name and not name.startswith(f"{e.name}."):
                raise _failed(name, e) from e  # the plugin is there, one of its own imports is not
            raise ConfigError(f"${ENV}: cannot import plugin {name!r} ({e}); is it on PYTHONPATH?") from e
        except Exception as e:  # a plugin is user code: any error of it is its error, not stillroom's bug
            raise _failed(name, e) from e
    return names


def _failed(name: str, e: Exception) -> ConfigError:
    """One line naming the plugin and where its error happened (a SyntaxError's file and line)."""
    if isinstance(e, SyntaxError):
        where = f"{e.filename}:{e.lineno}"
    else:
        tb = traceback.extract_tb(e.__traceback__)
        where = f"{tb[-1].filename}:{tb[-1].lineno}" if tb else "?"
    detail = " ".join(str(e).split())[:200]
    return ConfigError(f"${ENV}: plugin {name!r} failed to load: {type(e).__name__} at {where}: {detail}")
