"""Phase 1's loader side: batches of replayed views, unit by unit, built inside DataLoader workers.

Each worker takes whole units (view block x shard): it reads the shard once, decodes every image once
and replays every view of the block from it, recording the digest of the replayed pixels on the rows
the cache checks (:func:`pipeline.views.pixels.checked_row`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.cache import CacheMeta
from pipeline.errors import WorkerError
from pipeline.interrupt import StopSignals, close_loader, fetch, worker_signals
from pipeline.partition import my_share
from pipeline.shards.decode import iter_decoded
from pipeline.shards.lists import ShardInfo
from pipeline.shards.samples import OnError, SkipStats
from pipeline.views.pixels import checked_row, pixel_digest, stack_views
from pipeline.views.recipe import Recipe
from pipeline.views.replay import View, replay_shard


class UnitStream(IterableDataset):
    """Yields teacher-ready batches of replayed views, unit by unit, then an end-of-unit record.

    Runs inside DataLoader workers; each worker takes every n-th unit, so a unit is never split
    across workers and its image decodes happen once.
    """

    def __init__(
        self,
        units: list[tuple[int, int]],
        shards: list[ShardInfo],
        meta: CacheMeta,
        recipe: Recipe,
        batch_size: int,
        on_error: OnError,
    ):
        self.units, self.shards, self.meta, self.recipe = units, shards, meta, recipe
        self.batch_size, self.on_error = batch_size, on_error

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        units = my_share(self.units, info.id, info.num_workers) if info else self.units
        for block, s in units:
            yield from self._unit(block, s)

    def _unit(self, block: int, s: int) -> Iterator[dict[str, Any]]:
        shard = self.shards[s]
        views = self.meta.block_views(block)
        stats = SkipStats()
        samples = iter_decoded(shard, s, self.meta.num_classes, self.on_error, stats)
        pending: list[View] = []
        positions: set[int] = set()
        for view in replay_shard(samples, views, self.recipe, self.meta.seed, shard.name, shard.count):
            pending.append(view)
            positions.add(view.position)
            if len(pending) == self.batch_size:
                yield self._batch(block, s, pending, shard.name)
                pending = []
        if pending:
            yield self._batch(block, s, pending, shard.name)
        yield {"unit": (block, s), "end": True, "count": len(positions), "skipped": dict(stats.reasons)}

    def _batch(self, block: int, s: int, views: list[View], shard: str) -> dict[str, Any]:
        meta = self.meta
        checks = [
            pixel_digest(v.pixels) if checked_row(meta.seed, meta.views, v.view_id, shard, v.position) else 0
            for v in views
        ]
        return {
            "unit": (block, s),
            "end": False,
            "pixels": stack_views([v.pixels for v in views]),
            "position": torch.tensor([v.position for v in views]),
            "view": torch.tensor([v.view_id for v in views]),
            "label": torch.tensor([v.label for v in views]),
            "digest": torch.tensor([v.digest for v in views], dtype=torch.int64),
            "pixel_digest": torch.tensor(checks, dtype=torch.int64),
            "keys": [v.key for v in views],
        }


def unit_batches(stream: UnitStream, workers: int, device: torch.device, stop: StopSignals) -> Iterator[dict[str, Any]]:
    """The stream's items from ``workers`` loader workers (at most one per unit), until it ends or a stop signal
    comes; a loader worker that dies (or is sent SIGTERM alone) is one :class:`~pipeline.errors.WorkerError`."""
    workers = min(workers, len(stream.units))
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        worker_init_fn=worker_signals,
    )
    items, end = iter(loader), object()
    try:
        while stop.received is None:
            try:
                item = fetch(items, end)
            except Exception as e:
                if stop.received is not None:
                    return  # the workers got the job's signal too
                if isinstance(e, WorkerError):
                    raise WorkerError(
                        f"{e}; the units finished before are written: run the same command again"
                    ) from None
                raise
            if item is end:
                return
            yield item
    finally:  # ended, failed or stopped: the workers go now
        close_loader(items)
