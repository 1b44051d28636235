"""Progress bars (rich) for long work; a silent stand-in when disabled or not on rank 0."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text


class _Rate(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"- {self.unit}/s", style="cyan")


class Bar:
    """What callers see: ``advance(n)`` and ``set(**fields)`` (extra text such as the loss)."""

    def __init__(self, progress: Progress | None, task: Any):
        self._progress, self._task = progress, task
        self.started = time.perf_counter()

    def advance(self, n: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def set(self, **fields: Any) -> None:
        if self._progress is not None:
            text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            self._progress.update(self._task, info=text)


@contextlib.contextmanager
def progress_bar(description: str, total: float | None, unit: str = "it", enabled: bool = True) -> Iterator[Bar]:
    """A progress bar with count, rate and ETA on stderr; disabled bars cost nothing."""
    if not enabled:
        yield Bar(None, None)
        return
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
        task = progress.add_task(description, total=total, info="")
        yield Bar(progress, task)
