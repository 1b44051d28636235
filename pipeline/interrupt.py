"""Ctrl-C and preemption: SIGINT and SIGTERM become a request to stop at the next safe point.

A ``KeyboardInterrupt`` raised wherever the signal lands (inside a DataLoader starting its workers,
inside a collective, inside a checkpoint write) can be swallowed or leave state half-written. Instead
the handler only records the signal; the loops of both phases check it (phase 2 once per step, at an
optimizer-step boundary, phase 1 once per batch), save their position (``last.pth``; the finished units)
and stop with :class:`RunInterrupted`: status 128 + the signal, 143 for SIGTERM.

Loader workers get a terminal's Ctrl-C and a batch system's SIGTERM too: both go to the whole process
group. They ignore Ctrl-C and take SIGTERM as a request as well (:func:`worker_signals`): at their next
sample they raise :class:`~pipeline.errors.WorkerStopped`, which reaches the main process with the next
batch, in one piece. The main process got the signal too, and stops; if it did not, the worker was sent
SIGTERM on its own, and the run stops as for a dead worker. torch's SIGCHLD handler, which raises a dead
worker's error wherever the main process happens to be (in the middle of a checkpoint write), is kept out
while these commands run: :func:`fetch` reports a dead worker where the batch is fetched instead.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType, TracebackType
from typing import Any

from pipeline.errors import StillroomError, WorkerError, WorkerStopped

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
            _no_sigchld_raise()
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


_worker_signal: list[int] = []  # in a loader worker: the SIGTERM it was sent


def worker_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers leave Ctrl-C to the main process, and take SIGTERM as a request
    to stop at their next sample (:func:`stop_if_asked`), never ending half-way through a message to it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_sigterm)


def _worker_sigterm(signum: int, frame: FrameType | None) -> None:
    if _worker_signal:  # asked twice (torch's or multiprocessing's terminate() at shutdown): end now
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    _worker_signal.append(signum)


def stop_if_asked() -> None:
    """In a loader worker sent SIGTERM: raise :class:`~pipeline.errors.WorkerStopped` (called once per sample).

    A no-op in the main process, which never installs the handler.
    """
    if _worker_signal:
        raise WorkerStopped(f"data loader worker (pid {os.getpid()}) was sent signal {_worker_signal[0]}")


_NO_DEFAULT: Any = object()


def fetch(items: Iterator[Any], default: Any = _NO_DEFAULT) -> Any:
    """``next(items)`` from a DataLoader iterator, where a loader worker that died (the OOM killer's SIGKILL) or
    was sent SIGTERM alone becomes one :class:`~pipeline.errors.WorkerError` naming it.

    A dead worker surfaces as torch's "exited unexpectedly", or as a broken message (``EOFError``...) when it
    died while sending one: any failure that is not an expected error is checked against the workers' exit
    codes before it is passed on.
    """
    try:
        return next(items) if default is _NO_DEFAULT else next(items, default)
    except WorkerStopped:
        raise WorkerStopped("a data loader worker was sent SIGTERM on its own (not the whole job)") from None
    except StillroomError:
        raise
    except Exception:
        death = _dead_worker(items)
        if death is None:
            raise
        raise WorkerError(death) from None


def _dead_worker(items: Iterator[Any], wait_s: float = 2.0) -> str | None:
    """The first worker of a DataLoader iterator that ended with a failure, in words (None if all live on)."""
    workers = getattr(items, "_workers", [])
    deadline = time.monotonic() + wait_s  # a worker killed while sending is reaped a moment after
    while True:
        for w in workers:
            code = w.exitcode
            if code is not None and code != 0:
                if code < 0:
                    how = f"was killed by signal {-code} ({signal.Signals(-code).name})"
                    if -code == signal.SIGKILL:
                        how += ", most likely by the kernel's OOM killer (see dmesg; fewer --workers need less memory)"
                else:
                    how = f"exited with status {code}"
                return f"data loader worker (pid {w.pid}) {how}"
        if not workers or time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def close_loader(batches: Iterator[Any]) -> None:
    """Shut a DataLoader iterator's workers down now (torch does it when the iterator is freed, which an
    exception's traceback can put off until the interpreter's exit handlers, which then wait on the workers)."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def _no_sigchld_raise() -> None:
    """Keep torch's SIGCHLD handler out of this process: it raises a dead worker's error at whatever line the
    main process is on; the fetch that needs the worker reports it instead (within torch's status interval)."""
    from torch.utils.data._utils import signal_handling

    signal_handling._SIGCHLD_handler_set = True  # torch installs its handler only while this is False
