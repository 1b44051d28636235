"""Checkpoints: one dict for every stateful part, written atomically, loadable with weights_only.

Only tensors, numbers, strings, lists and dicts go in (no pickled objects), so
``torch.load(..., weights_only=True)`` reads every checkpoint this project writes.
"""

from __future__ import annotations

import os
from typing import Any

import torch


def save_atomic(state: dict[str, Any], path: str) -> None:
    """Write to a temp file in the same directory, fsync, then ``os.replace``: never half-written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)


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
