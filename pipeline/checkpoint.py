"""Checkpoints: one dict for every stateful part, written atomically, loadable with weights_only.

Only tensors, numbers, strings, lists and dicts go in (no pickled objects), so
``torch.load(..., weights_only=True)`` reads every checkpoint this project writes.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .errors import CheckpointError


def save_atomic(state: dict[str, Any], path: str) -> None:
    """Write to a temp file in the same directory, fsync, then ``os.replace``: never half-written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load(path: str) -> dict[str, Any]:
    """Read a checkpoint; an absent, truncated or foreign file is a :class:`CheckpointError` naming it."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, pickled objects...
        raise CheckpointError(f"checkpoint {path!r} cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path!r} does not hold a dict")
    return state


class Checkpointer:
    """``last.pth`` (everything needed to resume) and ``best.pth`` in one output folder.

    Only the main rank writes; every rank may read (``--resume`` on a shared ``--out``).
    """

    def __init__(self, folder: str, writer: bool):
        self.folder, self.writer = folder, writer
        self.last_path = os.path.join(folder, "last.pth")
        self.best_path = os.path.join(folder, "best.pth")

    def save(self, state: dict[str, Any], best: bool = False) -> None:
        if self.writer:
            save_atomic(state, self.best_path if best else self.last_path)

    def load_last(self) -> dict[str, Any] | None:
        return load(self.last_path) if os.path.exists(self.last_path) else None


def rng_state() -> dict[str, Any]:
    """Torch RNG state (drop path and dropout draw from it); data replay uses none of it."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
