"""Ctrl-C and preemption: SIGINT and SIGTERM become a request to stop at the next safe point.

A ``KeyboardInterrupt`` raised wherever the signal lands (inside a DataLoader starting its workers,
inside a collective, inside a checkpoint write) can be swallowed or leave state half-written. Instead
the handler only records the signal; the training loop checks it once per step, at an optimizer-step
boundary, saves ``last.pth`` at that exact position and stops with :class:`RunInterrupted`. Loader
workers ignore Ctrl-C (a terminal sends it to the whole process group; the main process shuts them
down). They keep SIGTERM's default, which is how ``multiprocessing`` ends them at exit; a batch
system's SIGTERM to the group may end them first, and the trainer then takes the failed fetch as the
stop it was asked for.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(Exception):
    """The run stopped on a signal after saving its position; ``--resume`` continues it exactly."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process ended by that signal


class StopSignals:
    """Within the ``with`` block, SIGINT/SIGTERM set :attr:`received` instead of interrupting."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in _SIGNALS}
        return self

    def __exit__(self, kind: type | None, value: BaseException | None, tb: TracebackType | None) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)  # type: ignore[arg-type]


def sigterm_interrupts() -> None:
    """Make SIGTERM end a command like Ctrl-C (``KeyboardInterrupt``, so ``finally`` blocks run).

    Needed where stillroom is PID 1 of a container: the kernel ignores a signal's default action for
    PID 1, so ``docker stop`` would otherwise wait and then SIGKILL. ``train-student`` replaces this
    with :class:`StopSignals` to save its position first.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)


class Terminated(KeyboardInterrupt):
    """SIGTERM, delivered like Ctrl-C; ``signum`` gives the exit status 128 + 15."""

    signum = signal.SIGTERM


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


def ignore_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers leave Ctrl-C to the main process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
