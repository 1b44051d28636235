"""Phase 1's background writer: finished units are stored by one thread, in order, so the teacher never
waits on storage (a slow object store costs the teacher only the final drain)."""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from pipeline.cache import Cache, UnitData
from pipeline.errors import StorageError

# Finished units waiting for the writer thread: enough to ride out a slow write, few enough to bound memory.
WRITE_QUEUE_UNITS = 4


class UnitWriter:
    """Writes finished units in a one-thread pool, in order, with at most ``depth`` units waiting.

    Each unit's chunks and then its marker are written by :meth:`Cache.write_unit`, so SIGKILL still
    leaves only whole units done. The first write error stops further writes and is raised in the
    teacher's thread (at the next unit it hands over, or at the end), naming the unit; leaving the
    ``with`` block waits until every queued unit is written. ``depth`` 0 writes inline.
    """

    def __init__(self, cache: Cache, summary: dict[str, Any], depth: int | None = None):
        self.cache, self.summary = cache, summary
        self.depth = WRITE_QUEUE_UNITS if depth is None else depth
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="cache-writer") if self.depth else None
        self.pending: deque[Future] = deque()
        self.failed = False

    def __enter__(self) -> UnitWriter:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:
        t0 = time.perf_counter()
        if self.pool is not None:
            self.pool.shutdown(wait=True)  # units queued before a failure elsewhere are still written
        self._waited(t0)
        if exc is None:
            while self.pending:
                self.pending.popleft().result()

    def submit(self, block: int, shard: int, unit: UnitData, count: int) -> None:
        """Hand over a finished unit; blocks only while the store is slower than the teacher (or inline)."""
        while self.pending and self.pending[0].done():
            self.pending.popleft().result()  # raises the first write error
        t0 = time.perf_counter()
        if self.pool is None:
            self._write(block, shard, unit, count)
        else:
            self.pending.append(self.pool.submit(self._write, block, shard, unit, count))
            while len(self.pending) > self.depth:
                self.pending.popleft().result()
        self._waited(t0)

    def _waited(self, since: float) -> None:
        self.summary["write_wait_s"] = round(self.summary.get("write_wait_s", 0.0) + time.perf_counter() - since, 3)

    def _write(self, block: int, shard: int, unit: UnitData, count: int) -> None:
        if self.failed:  # after a failure nothing more is written: the run is stopping
            return
        what = self.cache.meta.describe_unit(block, shard)
        try:
            self.cache.write_unit(block, shard, unit, count)
        except OSError as e:
            self.failed = True
            raise StorageError(f"cannot write {what} to cache {self.cache.url!r}: {type(e).__name__}: {e}") from e
        except BaseException as e:
            self.failed = True
            e.add_note(f"while writing {what} to cache {self.cache.url!r}")
            raise
