"""Phase 2 input: replayed copies of this rank's shards, joined to their cached teacher rows.

Every rank gets a disjoint set of shards each epoch (a seeded permutation of the shard list), and
a step budget computed from shard counts alone, identical on all ranks, so no rank waits forever
for a peer with more data (:mod:`pipeline.samplers`). DataLoader workers each take whole shards,
decode only the samples the epoch trains, replay their copies (one per view of the epoch's plan)
through the same :mod:`pipeline.replay` as phase 1, and look up each copy's cache row by (view,
shard, position), checking that the stored key and label are the sample's.

Workers send chunks of about 32 views (few, large messages), a sample's copies next to each other.
The trainer's :class:`ShuffleBuffer` draws whole samples at random from a few thousand views, so a
sample's copies land in the same or the next batch, as DeiT's repeated-augmentation sampler puts
them, and a batch costs O(batch size) whatever the buffer size.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .cache import UnitData, open_cache
from .decode import iter_decoded
from .errors import CacheError
from .interrupt import ignore_in_worker
from .partition import my_share
from .pixels import join_batches, stack_views
from .recipe import Recipe
from .replay import View, replay_copies
from .samplers import EpochPlan, covered
from .samples import OnError
from .shards import ShardInfo

CHUNK_VIEWS = 32


@dataclass
class StreamSpec:
    """Everything a worker needs to rebuild its share of an epoch (picklable, no open handles)."""

    shards: list[ShardInfo]
    shard_ids: list[int]  # indices into ``shards`` for this rank
    cache_shards: list[int] | None  # cache shard index of each entry of ``shards``; None = no cache
    cache_url: str | None
    plan: EpochPlan
    recipe: Recipe
    seed: int
    num_classes: int
    on_error: OnError = "raise"


class ViewStream(IterableDataset):
    """Yields collated chunks of copies (with cached targets when a cache is given)."""

    def __init__(self, spec: StreamSpec, chunk: int = CHUNK_VIEWS):
        self.spec, self.chunk = spec, chunk

    def __iter__(self) -> Iterator[dict[str, Any]]:
        spec = self.spec
        info = get_worker_info()
        ids = my_share(spec.shard_ids, info.id, info.num_workers) if info else spec.shard_ids
        cache = open_cache(spec.cache_url) if spec.cache_url else None  # opened in the worker, never forked
        for i in ids:
            shard = spec.shards[i]
            rows = None
            if cache is not None and spec.cache_shards is not None:
                rows = {v: cache.read_view(v, spec.cache_shards[i]) for v in spec.plan.views}
            positions = set(covered(spec.plan, spec.seed, shard))
            samples = iter_decoded(shard, i, spec.num_classes, spec.on_error, positions=positions)
            pending: list[list[View]] = []
            for copies in replay_copies(samples, spec.plan.views, spec.recipe, spec.seed, shard.name, shard.count):
                pending.append(copies)
                if sum(len(c) for c in pending) >= self.chunk:
                    yield collate(pending, rows, shard)
                    pending = []
            if pending:
                yield collate(pending, rows, shard)


def collate(items: list[list[View]], rows: dict[int, UnitData] | None, shard: ShardInfo) -> dict[str, Any]:
    """One chunk: the views of ``items`` (each a sample's copies) in order, ``item`` numbering them."""
    views = [v for copies in items for v in copies]
    batch: dict[str, Any] = {
        "pixels": stack_views([v.pixels for v in views]),
        "label": torch.tensor([v.label for v in views]),
        "mix_label": torch.tensor([v.mix_label for v in views]),
        "lam": torch.tensor([v.lam for v in views], dtype=torch.float32),
        "views": torch.tensor([v.view_id for v in views]),
        "item": torch.tensor([n for n, copies in enumerate(items) for _ in copies]),
        "keys": [v.key for v in views],
    }
    if rows is not None:
        batch.update(_targets(views, rows, shard))
    return batch


def _targets(views: list[View], rows: dict[int, UnitData], shard: ShardInfo) -> dict[str, torch.Tensor]:
    """Each copy's cached teacher targets, after checking that its row holds this very sample."""
    values, indices, lse = [], [], []
    for v in views:
        row = rows[v.view_id]
        stored, label, digest = row.keys[v.position], row.labels[v.position], int(row.digests[v.position])
        if stored != v.key or label != v.label:
            raise CacheError(
                f"shard {shard.url!r} position {v.position}: cache row holds key {stored!r} label {label}, "
                f"the shard has key {v.key!r} label {v.label}; this cache was not built from these shards"
            )
        if digest and v.digest and digest != v.digest:
            raise CacheError(
                f"shard {shard.url!r} key {v.key!r}: its image bytes are not those the cache's teacher saw "
                f"(digest {v.digest:016x}, cache {digest:016x}); the shard was rebuilt: cache it again"
            )
        values.append(row.values[v.position])
        indices.append(row.indices[v.position])
        lse.append(row.logsumexp[v.position])
    return {
        "t_values": torch.from_numpy(np.stack(values).astype(np.float32)),
        "t_indices": torch.from_numpy(np.stack(indices).astype(np.int64)),
        "t_lse": torch.from_numpy(np.stack(lse)),
    }


def _join(parts: list[tuple[dict[str, Any], int, int]]) -> dict[str, Any]:
    """One batch from slices ``[a, b)`` of chunks; copies only the views it takes."""
    out: dict[str, Any] = {}
    for key in parts[0][0]:
        if key == "keys":
            out[key] = [k for chunk, a, b in parts for k in chunk[key][a:b]]
        elif key == "pixels":
            out[key] = join_batches([chunk[key][a:b] for chunk, a, b in parts])
        else:
            out[key] = torch.cat([chunk[key][a:b] for chunk, a, b in parts])
    return out


class ShuffleBuffer:
    """Chunks of views held for shuffling; batches are drawn a whole sample (all its copies) at a time.

    Drawing a sample is O(1) (swap with the last, pop) and assembling a batch copies only its own views,
    so a batch costs O(batch size) however large the buffer. A sample whose copies do not fit in the
    batch being filled starts the next one.
    """

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.items: list[tuple[int, int, int]] = []  # (chunk id, first view, end) of each sample's copies
        self.chunks: dict[int, dict[str, Any]] = {}
        self.refs: dict[int, int] = {}  # samples of a chunk not yet drawn in full
        self.carry: list[tuple[int, int, int]] = []  # the rest of a sample split by the last batch
        self.views = 0
        self._next_id = 0

    def add(self, chunk: dict[str, Any]) -> None:
        cid, self._next_id = self._next_id, self._next_id + 1
        item = chunk.pop("item").tolist()
        starts = [i for i in range(len(item)) if i == 0 or item[i] != item[i - 1]] + [len(item)]
        self.items += [(cid, a, b) for a, b in itertools.pairwise(starts)]
        self.chunks[cid], self.refs[cid] = chunk, len(starts) - 1
        self.views += len(item)

    def batch(self, size: int) -> dict[str, Any]:
        """``size`` views: the carried-over rest of the last sample first, then random whole samples."""
        parts, need = [], size
        while need:
            cid, a, b = self.carry.pop() if self.carry else self._draw()
            take = min(need, b - a)
            parts.append((cid, a, a + take))
            if a + take < b:
                self.carry.append((cid, a + take, b))
            else:
                self.refs[cid] -= 1
            need -= take
        self.views -= size
        out = _join([(self.chunks[cid], a, b) for cid, a, b in parts])
        for cid in {cid for cid, _, _ in parts}:
            if not self.refs[cid]:
                del self.refs[cid], self.chunks[cid]
        return out

    def _draw(self) -> tuple[int, int, int]:
        k = self.rng.randrange(len(self.items))
        self.items[k], self.items[-1] = self.items[-1], self.items[k]
        return self.items.pop()


def shuffled_batches(
    chunks: Iterator[dict[str, Any]], batch_size: int, buffer: int, seed: int
) -> Iterator[dict[str, Any]]:
    """Re-batch chunks into exact ``batch_size`` batches drawn at random from up to ``buffer`` views.

    Like webdataset's shuffle, the first batch comes once two batches' worth of views are held, and the
    buffer then grows by one batch per batch drawn until it holds ``buffer`` views: training starts in
    seconds, not after the buffer is full. Shuffling happens after replay and mixing, so it changes
    batch composition only, never a view.
    """
    buf = ShuffleBuffer(seed)
    target = min(buffer, 2 * batch_size)
    for chunk in chunks:
        buf.add(chunk)
        while buf.views >= max(target, batch_size):
            yield buf.batch(batch_size)
            target = min(buffer, target + batch_size)
    while buf.views >= batch_size:
        yield buf.batch(batch_size)


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
        worker_init_fn=ignore_in_worker,
    )
    yield from shuffled_batches(iter(loader), batch_size, shuffle_buffer, seed)


def eval_batches(spec: StreamSpec, batch_size: int, workers: int) -> Iterator[dict[str, Any]]:
    """All of one rank's evaluation samples, in order, in batches of at most ``batch_size``."""
    workers = min(workers, len(spec.shard_ids))
    loader = DataLoader(
        ViewStream(spec),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        worker_init_fn=ignore_in_worker,
    )
    pending: list[tuple[dict[str, Any], int, int]] = []
    held = 0
    for chunk in loader:
        chunk.pop("item")
        pending.append((chunk, 0, len(chunk["keys"])))
        held += len(chunk["keys"])
        while held >= batch_size:
            parts, need = [], batch_size
            while need:
                c, a, b = pending.pop(0)
                take = min(need, b - a)
                parts.append((c, a, a + take))
                if a + take < b:
                    pending.insert(0, (c, a + take, b))
                need -= take
            held -= batch_size
            yield _join(parts)
    if pending:
        yield _join(pending)
