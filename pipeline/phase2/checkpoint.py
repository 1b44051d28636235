"""Checkpoints and the output folder: one dict for every stateful part, written atomically, loadable
with weights_only; which folder a run may write and which checkpoint it may continue.

Only tensors, numbers, strings, lists and dicts go in (no pickled objects), so
``torch.load(..., weights_only=True)`` reads every checkpoint this project writes.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from typing import Any

import torch

from pipeline.errors import CheckpointError, ConfigError
from pipeline.train_options import TrainConfig

log = logging.getLogger(__name__)


def save_atomic(state: dict[str, Any], path: str) -> None:
    """Write to a temp file in the same directory, fsync, then ``os.replace``: never half-written.

    Raises:
        CheckpointError: the file cannot be written, in one line naming it and the free space (torch
            reports a full disk as ``enforce fail at inline_container.cc ... unexpected pos``).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, (OSError, RuntimeError)):
            raise CheckpointError(f"cannot write checkpoint {path!r}: {_write_failure(e, folder)}") from e
        raise


def _write_failure(e: BaseException, folder: str) -> str:
    free = shutil.disk_usage(folder).free
    space = f"{free / 1e6:,.1f} MB free on {folder}"
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "unexpected pos" in str(e):
        return f"no space left on the device ({space}; the file was not replaced)"
    detail = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())[:200]
    return f"{type(e).__name__}: {detail} ({space})"


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


RUN_FILES = ("last.pth", "best.pth", "metrics.jsonl")


def _previous_run(cfg: TrainConfig) -> list[str]:
    return [name for name in RUN_FILES if os.path.exists(os.path.join(cfg.out, name))]


def prepare_out(cfg: TrainConfig) -> None:
    """Refuse to write over a previous run unless told how (``--resume`` or ``--force-new``), and make
    sure ``--out`` is writable before any work. Nothing is moved here: ``--force-new`` moves the previous
    run aside (:func:`move_previous_aside`) only once everything else the run needs has been checked."""
    previous = _previous_run(cfg)
    if cfg.resume and previous and "last.pth" not in previous:
        raise ConfigError(
            f"--resume: {os.path.join(cfg.out, 'last.pth')} does not exist, but --out holds a run "
            f"({', '.join(previous)}): it cannot be continued; --force-new starts over (its files are moved aside)"
        )
    if cfg.resume and not previous:
        log.info("--resume: %s holds no run yet; starting one", cfg.out)
    if previous and not cfg.resume and not cfg.force_new:
        raise ConfigError(
            f"--out {cfg.out!r} already holds a run ({', '.join(previous)}): add --resume to continue it, "
            "or --force-new to start over (its files are moved aside, not deleted)"
        )
    try:
        os.makedirs(cfg.out, exist_ok=True)
        probe = os.path.join(cfg.out, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--out {cfg.out!r} is not writable: {e.strerror or e}") from None


def move_previous_aside(cfg: TrainConfig) -> None:
    """``--force-new``: move the previous run's files to ``OUT/replaced-<time>/`` (nothing is deleted).

    Called after the data, caches, models and options of the new run have been checked, so a new run
    that cannot start leaves the previous one in place, and ``--resume`` still continues it.
    """
    previous = _previous_run(cfg)
    if not (cfg.force_new and previous):
        return
    aside = os.path.join(cfg.out, time.strftime("replaced-%Y%m%d-%H%M%S"))
    os.makedirs(aside, exist_ok=True)
    for name in (*previous, "resolved-config.yaml", "tensorboard", "wandb"):  # --log-to's files too
        if os.path.exists(os.path.join(cfg.out, name)):
            shutil.move(os.path.join(cfg.out, name), os.path.join(aside, name))
    log.warning("--force-new: the previous run in %s was moved to %s", cfg.out, aside)
