"""Expected failures: bad options, bad input data, a bad cache, an unreadable checkpoint, a run that diverges.

Each is a :class:`StillroomError` whose message is one line naming what is at fault (the option,
file, shard, key, unit or field). The CLI prints such an error as ``error: <message>`` and exits
with status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class StillroomError(Exception):
    """Base of every expected failure."""


class ConfigError(StillroomError):
    """An option or config file is invalid; the message names the option or the file and key."""


class DataError(StillroomError):
    """Bad input data; the message names the shard and, where known, the sample key."""


class CacheError(StillroomError):
    """A cache is missing, incomplete, damaged or does not match; the message names the field or unit."""


class CheckpointError(StillroomError):
    """A weights or checkpoint file cannot be read or does not fit; the message names the file."""


class TrainingError(StillroomError):
    """A run cannot go on (its loss is not finite); the message names the step and the learning rate."""


class StorageError(StillroomError):
    """A file or object store cannot be reached or written; the message names the URL."""


class WorkerError(StillroomError):
    """A data loader worker process died, or was stopped alone (the kernel's OOM killer, a signal to its pid);
    the message names the worker and where the run's position was saved."""


class WorkerStopped(WorkerError):
    """Raised in a loader worker that was sent SIGTERM, at its next sample: the main process learns of it with
    the next batch, in one piece, and tells a stop of the whole job (it got the signal too) from one of the
    worker alone. Its one argument is the message (torch rebuilds it from that in the main process)."""
