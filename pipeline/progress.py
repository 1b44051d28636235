"""Progress of long work: a live bar on a terminal, plain log lines in a batch system's log file.

``--progress`` picks the form: ``bar`` (rich, redrawn in place on stderr), ``log`` (one line every
``STILLROOM_PROGRESS_INTERVAL`` seconds, 10 by default, and a last one when done: count, percent,
rate, ETA and the caller's fields such as the loss), ``off``, or ``auto``: a bar when stderr is a
terminal, log lines otherwise, so Docker, Kubernetes and Slurm logs get readable lines instead of
redraw fragments.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

log = logging.getLogger("stillroom.progress")


def _fields_text(fields: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())


def _duration(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Bar:
    """What callers see: ``advance(n)`` and ``set(**fields)``. This base class shows nothing."""

    def advance(self, n: float = 1) -> None:
        pass

    def set(self, **fields: Any) -> None:
        pass


class _RichBar(Bar):
    def __init__(self, progress: Progress, task: Any):
        self._progress, self._task = progress, task

    def advance(self, n: float = 1) -> None:
        self._progress.advance(self._task, n)

    def set(self, **fields: Any) -> None:
        self._progress.update(self._task, info=_fields_text(fields))


class LogBar(Bar):
    """One plain line per interval: ``epoch 3: 120/500 steps (24%) 41.2 steps/s ETA 0:00:09 loss=2.1``."""

    def __init__(self, description: str, total: float | None, unit: str, interval_s: float):
        self.description, self.total, self.unit, self.interval_s = description, total, unit, interval_s
        self.done = 0.0
        self.fields: dict[str, Any] = {}
        self.started = self.last = time.monotonic()

    def advance(self, n: float = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            self.last = now
            self.emit(now)

    def set(self, **fields: Any) -> None:
        self.fields = fields

    def emit(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        count = f"{self.done:,.0f}"
        if self.total:
            count += f"/{self.total:,.0f} {self.unit} ({100.0 * self.done / self.total:.0f}%)"
            eta = f" ETA {_duration((self.total - self.done) / rate)}" if rate > 0 else ""
        else:
            count, eta = f"{count} {self.unit}", ""
        extra = f" {_fields_text(self.fields)}" if self.fields else ""
        log.info(
            "%s: %s %.1f %s/s%s elapsed %s%s", self.description, count, rate, self.unit, eta, _duration(elapsed), extra
        )


class _Rate(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"- {self.unit}/s", style="cyan")


def resolve_mode(mode: str) -> str:
    """``auto`` becomes ``bar`` on a terminal and ``log`` otherwise."""
    if mode == "auto":
        return "bar" if sys.stderr.isatty() else "log"
    return mode


@contextlib.contextmanager
def progress_bar(description: str, total: float | None, unit: str = "it", mode: str = "auto") -> Iterator[Bar]:
    """Progress of one long loop, in the form ``mode`` asks for (see the module docstring)."""
    mode = resolve_mode(mode)
    if mode == "off":
        yield Bar()
    elif mode == "log":
        bar = LogBar(description, total, unit, float(os.environ.get("STILLROOM_PROGRESS_INTERVAL", "10")))
        yield bar
        bar.emit()
    else:
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _Rate(unit),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=Console(file=sys.stderr),
            transient=False,
        )
        with progress:
            yield _RichBar(progress, progress.add_task(description, total=total, info=""))
