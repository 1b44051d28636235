"""Training metrics as JSON lines (``OUT/metrics.jsonl``), and a per-rank debug trace for tests."""

from __future__ import annotations

import hashlib
import json
import os
import time
import weakref
from collections.abc import Sequence
from typing import Any

from torch import nn

from pipeline.errors import DataError
from pipeline.files import append_text
from pipeline.phase2.sinks import Sinks, open_sinks


class MetricsLog:
    """One JSON object per line (``{"event": ..., "time": ..., ...}``), appended by the main rank.

    Each line is also handed to the loggers of ``log_to`` (:mod:`pipeline.phase2.sinks`): the file is the record,
    the loggers are views of it. They are closed by :meth:`close`, or when this object goes away.
    """

    def __init__(self, path: str, enabled: bool, log_to: Sequence[str] = (), config: dict[str, Any] | None = None):
        self.path, self.enabled = path, enabled
        self.sinks: Sinks | None = None
        if enabled:
            folder = os.path.dirname(os.path.abspath(path))
            os.makedirs(folder, exist_ok=True)
            if log_to:
                name = os.path.basename(folder)
                self.sinks = open_sinks(log_to, folder, name, config, past=read_lines(path))
                weakref.finalize(self, self.sinks.close)

    def write(self, event: str, **fields: Any) -> None:
        if self.enabled:
            line = {"event": event, "time": round(time.time(), 3), **fields}
            append_text(self.path, json.dumps(line) + "\n")
            if self.sinks:
                self.sinks.write(line)

    def close(self) -> None:
        if self.sinks:
            self.sinks.close()


def read_lines(path: str) -> list[dict[str, Any]]:
    """The events of a metrics file (none if it does not exist); a line cut short by a kill is skipped.

    Raises:
        DataError: a line is JSON but not an object (a kill cannot leave one: the file is not a run's record).
    """
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for number, text in enumerate(f, 1):
            try:
                line = json.loads(text)
            except json.JSONDecodeError:
                continue
            if not isinstance(line, dict):
                raise DataError(
                    f"{path} line {number}: {text.strip()[:60]!r} is not a JSON object (not a train-student record)"
                )
            out.append(line)
    return out


class DebugTrace:
    """With ``STILLROOM_DEBUG_DIR`` set, each rank appends every step's sample keys and a digest of its
    parameters to ``rank<r>.jsonl``: how tests check DDP sharding and synchronisation. With
    ``STILLROOM_DEBUG_STOP_AT_STEP=N`` every rank acts as if SIGTERM arrived at global step ``N`` (tests of
    multi-rank resume at an exact position)."""

    def __init__(self, rank: int):
        self.stop_at = int(os.environ.get("STILLROOM_DEBUG_STOP_AT_STEP", "-1"))
        folder = os.environ.get("STILLROOM_DEBUG_DIR")
        self.path = os.path.join(folder, f"rank{rank}.jsonl") if folder else None
        if folder:
            os.makedirs(folder, exist_ok=True)

    def record(self, model: nn.Module, **fields: Any) -> None:
        if self.path is None:
            return
        h = hashlib.sha256()
        for p in model.parameters():
            h.update(p.detach().cpu().numpy().tobytes())
        with open(self.path, "a") as f:
            f.write(json.dumps({**fields, "params_sha256": h.hexdigest()}) + "\n")


class StepMeter:
    """An epoch's steps as they are trained: the progress display, a ``train`` line every ``log_every``
    steps, and the epoch's loss and throughput (images over all ranks)."""

    def __init__(self, metrics: MetricsLog, bar: Any, log_every: int, world: int):
        self.metrics, self.bar, self.log_every, self.world = metrics, bar, log_every, world
        self.t0, self.seen, self.loss_sum, self.trained = time.perf_counter(), 0, 0.0, 0

    def step(self, epoch: int, step: int, losses: tuple[float, float, float], images: int, lr: float) -> None:
        self.seen, self.loss_sum, self.trained = self.seen + images, self.loss_sum + losses[0], self.trained + 1
        rate = self.seen * self.world / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.advance()
        self.bar.set(loss=losses[0], lr=lr, img_s=rate)
        if self.log_every and (step + 1) % self.log_every == 0:
            fields = dict(zip(("loss", "base_loss", "distill_loss"), losses, strict=True))
            self.metrics.write("train", epoch=epoch, step=step + 1, **fields, lr=lr, img_per_s=round(rate, 2))

    def summary(self) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.t0
        return {
            "steps": self.trained,
            "train_loss": self.loss_sum / max(self.trained, 1),
            "img_per_s": round(self.seen * self.world / max(elapsed, 1e-9), 2),
            "epoch_s": round(elapsed, 3),
        }
