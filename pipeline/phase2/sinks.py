"""TensorBoard and Weights & Biases as extra readers of the metrics events (``--log-to``).

:class:`~pipeline.phase2.metrics.MetricsLog` hands every line it appends to ``metrics.jsonl`` to a :class:`Sinks`,
so what the loggers show is derived from the record and never the other way round: the training loop
knows nothing of them. A logger that fails (a full disk, a W&B service that died) is closed with one
warning and the run goes on; ``metrics.jsonl`` stays complete. The packages are optional extras, imported
only here and only when asked for (``pipeline.options`` refuses a missing one before any work).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import netrc
import os
from collections.abc import Iterable, Sequence
from typing import Any, Protocol
from urllib.parse import urlparse

from pipeline.options import CacheConfig
from pipeline.partition import job_slot

log = logging.getLogger(__name__)

# Fields that are the x of an event rather than something to plot against it.
X_FIELDS = {"train": ("epoch", "step"), "epoch": ("epoch",), "interrupted": ("epoch", "step")}


def scalars_of(fields: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Every finite number of an event, nested mappings joined with ``/`` (``copies/skipped/unreadable``).

    A list of numbers (an epoch's ``views``) becomes its ``min``, ``max`` and ``count``; strings, booleans
    and the timestamp are not scalars.
    """
    out: dict[str, float] = {}
    for key, value in fields.items():
        name = f"{prefix}{key}"
        if key == "time" or isinstance(value, bool):
            continue
        if isinstance(value, dict):
            out.update(scalars_of(value, f"{name}/"))
        elif isinstance(value, list) and value and all(isinstance(v, int | float) for v in value):
            out.update({f"{name}/min": min(value), f"{name}/max": max(value), f"{name}/count": len(value)})
        elif isinstance(value, int | float) and math.isfinite(value):
            out[name] = float(value)
    return out


class StepClock:
    """The global step of an event from its ``(epoch, step in epoch)``, all that ``train`` lines carry.

    Steps per epoch are learnt from ``epoch`` lines (their ``steps`` plus the step a resumed epoch
    started at); a resumed run first reads the lines its ``metrics.jsonl`` holds. The first epoch of a
    fresh run needs none: its offset is 0.
    """

    def __init__(self, past: Iterable[dict[str, Any]] = ()):
        self.per_epoch, self.started = 0, (-1, 0)
        for line in past:
            self.see(line)

    def see(self, line: dict[str, Any]) -> int:
        """Account for ``line``; return its global step."""
        if line.get("event") == "start":
            self.started = (int(line.get("first_epoch", 0)), int(line.get("start_step", 0)))
        elif line.get("event") == "epoch":
            resumed_at = self.started[1] if line.get("epoch") == self.started[0] else 0
            self.per_epoch = max(self.per_epoch, int(line.get("steps", 0)) + resumed_at)
        epoch = int(line.get("epoch", line.get("first_epoch", 0)))
        return epoch * self.per_epoch + int(line.get("step", line.get("start_step", 0)))


class Sink(Protocol):
    """A logger: given each metrics line, its scalars and its global step; closed once at the end."""

    def write(self, line: dict[str, Any], scalars: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoardSink:
    """Scalars as ``<event>/<field>``: train lines at their global step, epoch lines at their epoch."""

    def __init__(self, folder: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=folder)

    def write(self, line: dict[str, Any], scalars: dict[str, float], step: int) -> None:
        event = line["event"]
        if event == "start":
            self.writer.add_text("start", f"```\n{json.dumps(line, indent=1)}\n```", step)
        x = int(line["epoch"]) if event == "epoch" else step
        for name, value in scalars.items():
            if name not in X_FIELDS.get(event, ()):
                self.writer.add_scalar(f"{event}/{name}", value, x, walltime=line.get("time"))
        self.writer.flush()  # a killed run keeps what it logged, as metrics.jsonl does

    def close(self) -> None:
        self.writer.close()


def wandb_mode() -> str | None:
    """``WANDB_MODE`` decides when set; otherwise online only with an API key (``WANDB_API_KEY`` or the
    ``~/.netrc`` entry ``wandb login`` writes), offline without one, so no account is ever needed."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return None
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        found = netrc.netrc(os.environ.get("NETRC")).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        found = None
    return None if found else "offline"


class WandbSink:
    """One W&B run per process, its files under ``folder/wandb``; train scalars plotted against
    ``train/global_step``, epoch scalars against ``epoch/epoch``, ``start`` fields added to its config."""

    def __init__(self, folder: str, name: str, group: str, config: dict[str, Any]):
        import wandb

        os.makedirs(folder, exist_ok=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "stillroom"),
            dir=folder,
            name=name,
            group=group,
            config=config,
            mode=wandb_mode(),  # type: ignore[arg-type]
            reinit="create_new",  # the demo trains three runs in one process
            settings=wandb.Settings(console="off"),  # scalars only: stdout stays the CLI's
        )
        self.run.define_metric("train/*", step_metric="train/global_step")
        self.run.define_metric("epoch/*", step_metric="epoch/epoch")

    def write(self, line: dict[str, Any], scalars: dict[str, float], step: int) -> None:
        event = line["event"]
        if event == "start":
            start = {k: v for k, v in line.items() if k not in ("event", "time")}
            self.run.config.update({"start": start}, allow_val_change=True)
            return
        extra = {"global_step": step} if event == "train" else {}
        self.run.log({f"{event}/{k}": v for k, v in {**scalars, **extra}.items()})
        if event not in ("train", "epoch"):
            self.run.summary.update({f"{event}/{k}": v for k, v in scalars.items()})

    def close(self) -> None:
        self.run.finish()


class Sinks:
    """The loggers of one run or job, fed the lines of its metrics record."""

    def __init__(self, sinks: list[Sink], past: Iterable[dict[str, Any]] = ()):
        self.sinks, self.clock = sinks, StepClock(past)

    def write(self, line: dict[str, Any]) -> None:
        """Hand one metrics line to every logger; a failing logger is closed and dropped, not fatal."""
        step, scalars = self.clock.see(line), scalars_of({k: v for k, v in line.items() if k != "event"})
        for sink in list(self.sinks):
            try:
                sink.write(line, scalars, step)
            except Exception as e:
                what = type(sink).__name__
                log.warning("--log-to: %s failed (%s); it gets no more metrics (metrics.jsonl has them all)", what, e)
                self.sinks.remove(sink)
                _close_quietly(sink)

    def close(self) -> None:
        for sink in self.sinks:
            _close_quietly(sink)
        self.sinks = []


def _close_quietly(sink: Sink) -> None:
    try:
        sink.close()
    except Exception as e:  # closing is best effort: the record is metrics.jsonl
        log.warning("--log-to: closing %s failed: %s", type(sink).__name__, e)


def open_sinks(
    log_to: Sequence[str],
    folder: str,
    name: str,
    config: dict[str, Any] | None = None,
    past: Iterable[dict[str, Any]] = (),
) -> Sinks:
    """The loggers ``log_to`` names, writing under ``folder`` (TensorBoard: ``folder/tensorboard``).

    Args:
        log_to: Logger names (``pipeline.options.LOG_TO``), checked installed when the config was.
        folder: Where their files go: a run's ``OUT``, or a cache job's log folder.
        name: The W&B run's name; its group is the folder's name, so a resumed run's parts sit together.
        config: The resolved options, shown by W&B.
        past: Lines already in the record (a resumed run), so global steps continue where they were.
    """
    made: list[Sink] = []
    for kind in dict.fromkeys(log_to):
        try:
            if kind == "tensorboard":
                made.append(TensorBoardSink(os.path.join(folder, "tensorboard")))
            elif kind == "wandb":
                group = os.path.basename(os.path.abspath(folder))
                made.append(WandbSink(folder, name, group, config or {}))
        except Exception as e:  # installed but broken (an import that fails, a service down): the record goes on
            detail = " ".join(str(e).split())[:200]
            log.warning(
                "--log-to: %s cannot start (%s: %s); it is left out (metrics.jsonl has every line)",
                kind,
                type(e).__name__,
                detail,
            )
    return Sinks(made, past)


def cache_log_folder(url: str) -> str:
    """Where ``cache-teacher --log-to`` writes: ``runs/cache-teacher-<cache name>`` in the working folder
    (TensorBoard's own default root), never inside the cache, whose store holds only its own objects."""
    name = os.path.basename(url.rstrip("/")).removesuffix(".zarr") or "cache"
    return os.path.join("runs", f"cache-teacher-{name}")


def log_cache_summary(cfg: CacheConfig, summary: dict[str, Any]) -> str:
    """Log one ``cache-teacher`` job's summary (units, decodes, views, bytes, time) as a ``cache_teacher``
    event at step = its job index, so the jobs of an array line up in one chart. Returns the folder.

    Every job logs its own share: phase-1 jobs (ranks under torchrun too) are independent.
    """
    folder = cache_log_folder(cfg.out)
    index, count, _ = job_slot(cfg.job_index, cfg.job_count)
    wall = float(summary.get("wall_s") or 0.0)
    line = {
        "event": "cache_teacher",
        "step": index,
        **summary,
        "job_index": index,
        "job_count": count,
        "views_per_s": round(summary.get("views", 0) / wall, 2) if wall else 0.0,
    }
    sinks = open_sinks(cfg.log_to, folder, f"cache-teacher job {index} of {count}", dataclasses.asdict(cfg))
    try:
        sinks.write(line)
    finally:
        sinks.close()
    return folder
