"""Phase 2 input: replayed views of this rank's shards, joined to their cached teacher rows.

Every rank gets a disjoint set of shards each epoch (a seeded permutation of the shard list), and
a step budget computed from shard counts alone, identical on all ranks, so no rank waits forever
for a peer with more data. DataLoader workers each take whole shards, replay view ``v(epoch)``
through the same :func:`pipeline.replay.replay_shard` as phase 1, and look up each sample's
cache row by (shard, position), checking that the stored key is the sample's key.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .cache import UnitData, open_cache
from .errors import CacheError
from .partition import my_share
from .recipe import Recipe
from .replay import View, replay_shard
from .seeding import stable_seed
from .shards import OnError, ShardInfo, iter_decoded


def view_for_epoch(epoch: int, num_views: int) -> int:
    """The cached view trained on in ``epoch``; views repeat after ``num_views`` epochs."""
    return epoch % num_views


def rank_shards(shards: list[ShardInfo], epoch: int, seed: int, rank: int, world: int) -> list[int]:
    """Indices (into ``shards``) that ``rank`` reads in ``epoch``: disjoint across ranks."""
    order = list(range(len(shards)))
    random.Random(stable_seed("shard-order", seed, epoch)).shuffle(order)
    return my_share(order, rank, world)


def steps_per_epoch(shards: list[ShardInfo], epoch: int, seed: int, world: int, batch_size: int) -> int:
    """Batches every rank yields in ``epoch``: the smallest rank's full batches."""
    per_rank = [sum(shards[i].count for i in rank_shards(shards, epoch, seed, r, world)) for r in range(world)]
    return min(per_rank) // batch_size


@dataclass
class StreamSpec:
    """Everything a worker needs to rebuild its share of an epoch (picklable, no open handles)."""

    shards: list[ShardInfo]
    shard_ids: list[int]  # indices into ``shards`` for this rank
    cache_rows: list[int] | None  # cache shard index of each entry of ``shards``; None = no cache
    cache_url: str | None
    view: int
    recipe: Recipe
    seed: int
    num_classes: int
    on_error: OnError = "raise"


class ViewStream(IterableDataset):
    """Yields collated windows of replayed views (with cached targets when a cache is given)."""

    def __init__(self, spec: StreamSpec, chunk: int = 32):
        self.spec, self.chunk = spec, chunk

    def __iter__(self) -> Iterator[dict[str, Any]]:
        spec = self.spec
        info = get_worker_info()
        ids = my_share(spec.shard_ids, info.id, info.num_workers) if info else spec.shard_ids
        cache = open_cache(spec.cache_url) if spec.cache_url else None  # opened in the worker, never forked
        for i in ids:
            shard = spec.shards[i]
            rows = None
            if cache is not None and spec.cache_rows is not None:
                rows = cache.read_view(spec.view, spec.cache_rows[i])
            samples = iter_decoded(shard, i, spec.num_classes, spec.on_error)
            pending: list[View] = []
            for window in replay_shard(samples, [spec.view], spec.recipe, spec.seed, shard.name):
                pending.extend(window)
                if len(pending) >= self.chunk:  # fewer, larger messages between worker and trainer
                    yield collate(pending, rows, shard)
                    pending = []
            if pending:
                yield collate(pending, rows, shard)


def collate(window: list[View], rows: UnitData | None, shard: ShardInfo) -> dict[str, Any]:
    batch: dict[str, Any] = {
        "pixels": torch.stack([v.pixels for v in window]),
        "label": torch.tensor([v.label for v in window]),
        "mix_label": torch.tensor([v.mix_label for v in window]),
        "lam": torch.tensor([v.lam for v in window], dtype=torch.float32),
        "keys": [v.key for v in window],
    }
    if rows is not None:
        pos = np.array([v.position for v in window])
        for v, stored, label in zip(window, rows.keys[pos], rows.labels[pos], strict=True):
            if stored != v.key or label != v.label:
                raise CacheError(
                    f"shard {shard.url!r} position {v.position}: cache row holds key {stored!r} label {label}, "
                    f"the shard has key {v.key!r} label {v.label}; this cache was not built from these shards"
                )
        batch["t_values"] = torch.from_numpy(rows.values[pos].astype(np.float32))
        batch["t_indices"] = torch.from_numpy(rows.indices[pos].astype(np.int64))
        batch["t_lse"] = torch.from_numpy(rows.logsumexp[pos])
    return batch


def _cat(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in parts[0]:
        out[k] = [x for p in parts for x in p[k]] if k == "keys" else torch.cat([p[k] for p in parts])
    return out


def _take(buf: dict[str, Any], idx: list[int]) -> dict[str, Any]:
    t = torch.tensor(idx)
    return {k: ([v[i] for i in idx] if k == "keys" else v[t]) for k, v in buf.items()}


def shuffled_batches(
    windows: Iterator[dict[str, Any]], batch_size: int, buffer: int, seed: int
) -> Iterator[dict[str, Any]]:
    """Re-batch windows into exact ``batch_size`` batches drawn at random from a buffer.

    Shuffling happens after replay and mixing, so it changes batch composition only, never a view.
    """
    rng = random.Random(seed)
    pool: list[dict[str, Any]] = []
    n = 0
    for w in windows:
        pool.append(w)
        n += len(w["keys"])
        while n >= max(buffer, batch_size):
            merged = _cat(pool)
            order = list(range(n))
            rng.shuffle(order)
            yield _take(merged, order[:batch_size])
            rest = order[batch_size:]
            pool, n = [_take(merged, rest)], len(rest)
    if n >= batch_size:
        merged = _cat(pool)
        order = list(range(n))
        rng.shuffle(order)
        for start in range(0, n - batch_size + 1, batch_size):
            yield _take(merged, order[start : start + batch_size])


def epoch_batches(
    spec: StreamSpec, batch_size: int, workers: int, shuffle_buffer: int, seed: int, pin_memory: bool = False
) -> Iterator[dict[str, Any]]:
    """Exact-size batches of one rank's epoch (the caller stops after its step budget)."""
    workers = min(workers, len(spec.shard_ids))
    # A private generator: otherwise each new loader iterator draws its base seed from the global torch
    # RNG, which drop path also draws from, and a mid-epoch resume (which restores that RNG after the
    # epoch's loader was made) would replay a different stream.
    loader = DataLoader(
        ViewStream(spec),
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
        generator=torch.Generator().manual_seed(seed),
    )
    yield from shuffled_batches(iter(loader), batch_size, shuffle_buffer, seed)


def eval_batches(spec: StreamSpec, batch_size: int, workers: int) -> Iterator[dict[str, Any]]:
    """All of one rank's evaluation samples, in order, in batches of at most ``batch_size``."""
    workers = min(workers, len(spec.shard_ids))
    loader = DataLoader(ViewStream(spec), batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None)
    pool: list[dict[str, Any]] = []
    n = 0
    for w in loader:
        pool.append(w)
        n += len(w["keys"])
        if n >= batch_size:
            yield _cat(pool)
            pool, n = [], 0
    if pool:
        yield _cat(pool)
