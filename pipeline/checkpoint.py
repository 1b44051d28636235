"""Checkpoints and the output folder: one dict for every stateful part, written atomically, loadable
with weights_only; which folder a run may write and which checkpoint it may continue.

Only tensors, numbers, strings, lists and dicts go in (no pickled objects), so
``torch.load(..., weights_only=True)`` reads every checkpoint this project writes.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

import torch

from .errors import CheckpointError, ConfigError
from .options import TrainConfig

log = logging.getLogger(__name__)


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


def prepare_out(cfg: TrainConfig) -> None:
    """Refuse to write over a previous run unless told how (``--resume`` or ``--force-new``), and make
    sure ``--out`` is writable before any work."""
    names = ("last.pth", "best.pth", "metrics.jsonl")
    previous = [name for name in names if os.path.exists(os.path.join(cfg.out, name))]
    if previous and not cfg.resume:
        if not cfg.force_new:
            raise ConfigError(
                f"--out {cfg.out!r} already holds a run ({', '.join(previous)}): add --resume to continue it, "
                "or --force-new to start over (its files are moved aside, not deleted)"
            )
        aside = os.path.join(cfg.out, time.strftime("replaced-%Y%m%d-%H%M%S"))
        os.makedirs(aside, exist_ok=True)
        for name in (*previous, "resolved-config.yaml"):
            if os.path.exists(os.path.join(cfg.out, name)):
                shutil.move(os.path.join(cfg.out, name), os.path.join(aside, name))
        log.warning("--force-new: the previous run in %s was moved to %s", cfg.out, aside)
    try:
        os.makedirs(cfg.out, exist_ok=True)
        probe = os.path.join(cfg.out, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--out {cfg.out!r} is not writable: {e.strerror or e}") from None


# Settings that fix which samples the steps of an epoch hold: a mid-epoch checkpoint can only be
# continued with the same ones. At an epoch end only the global batch must stay (the schedule counts
# optimizer steps).
_STREAM_FIELDS = (
    "batch_size",
    "accum_steps",
    "workers",
    "shuffle_buffer",
    "max_steps_per_epoch",
    "repeats",
    "run_seed",
)


def check_resumable(cfg: TrainConfig, state: dict[str, Any], world: int, path: str) -> None:
    """Refuse a resume that would skip or repeat samples or jump the learning-rate schedule."""
    old = state.get("config", {})
    old_world = int(state.get("world", world))
    if int(state.get("step_in_epoch", 0)):
        where = f"{path} was taken mid-epoch (epoch {state['epoch']}, step {state['step_in_epoch']})"
        if old_world != world:
            raise ConfigError(f"{where} on {old_world} ranks, now {world}: resume on {old_world} ranks")
        for name in _STREAM_FIELDS:
            if name in old and old[name] != getattr(cfg, name):
                raise ConfigError(
                    f"{where} with --{name.replace('_', '-')} {old[name]}, now {getattr(cfg, name)}: it would skip "
                    f"or repeat samples; resume with --{name.replace('_', '-')} {old[name]}"
                )
    if "batch_size" in old:
        before = old["batch_size"] * old_world * old.get("accum_steps", 1)
        now = cfg.batch_size * world * cfg.accum_steps
        if before != now:
            raise ConfigError(
                f"{path}: the global batch was {before} (--batch-size x ranks x --accum-steps), now {now}: "
                "the learning-rate schedule counts optimizer steps; keep the global batch when resuming"
            )
