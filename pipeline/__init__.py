"""stillroom: offline knowledge distillation with a cached, view-exact teacher.

The public names (``docs/api.md``) are importable from here; they load on first use (PEP 562), so that
``import pipeline.errors`` or the shards layer never imports torch. Nothing in the library imports this module's
names: they are for users.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the module that implements it
_PUBLIC = {
    "DistillationLoss": "pipeline.models.losses",
    "DistillationSource": "pipeline.phase2.source",
    "Normalized": "pipeline.models.build",
    "StillroomError": "pipeline.errors",
}

__all__ = ["DistillationLoss", "DistillationSource", "Normalized", "StillroomError"]  # the keys of _PUBLIC

if TYPE_CHECKING:
    from pipeline.errors import StillroomError
    from pipeline.models.build import Normalized
    from pipeline.models.losses import DistillationLoss
    from pipeline.phase2.source import DistillationSource


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
