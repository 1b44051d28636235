"""Phase 2 input: this rank's share of the epoch (:mod:`pipeline.views.deal`), replayed lane by lane in loader
workers and drawn window by window into batches, with each copy's cached teacher targets.

A worker replays one lane: segment by segment it streams the shard, decodes the samples its segment
trains (and their mixing partners), replays each pair's copies for the epoch's views through the same
:mod:`pipeline.views.replay` as phase 1, and sends them ``CHUNK`` lane slots at a time, tagged with their lane
and copy index. A copy whose pixels cannot be exactly those its targets were computed on is not sent
but reported with why: the sample is unreadable now, or its mixing partner is (while the cache was made
from both), or the cache never held it. Its slot is filled with another copy of the same window, so
batches keep their size and every rank its steps (:class:`WindowBatches`).

Every copy's cache row is checked (key, label, image digest) and, on the rows phase 1 chose, the digest
of its replayed pixels: an environment that replays a single pixel differently stops the run, naming
the library versions that differ.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.cache import Cache, UnitData, open_cache, replay_mismatch
from pipeline.errors import CacheError, DataError
from pipeline.interrupt import close_loader, fetch, worker_signals
from pipeline.seeding import stable_seed
from pipeline.shards.decode import DecodedSample, iter_decoded
from pipeline.shards.lists import ShardInfo
from pipeline.shards.samples import OnError, SkipStats
from pipeline.views import deal as dl
from pipeline.views.pixels import checked_row, join_batches, pixel_digest, stack_views
from pipeline.views.plans import EpochPlan
from pipeline.views.recipe import Recipe
from pipeline.views.replay import View, pair_copies

UNREADABLE = "sample unreadable"
PARTNER_UNREADABLE = "mixing partner unreadable (both were read when the cache was made)"
NOT_CACHED = "not in the cache (unreadable when the cache was made)"


@dataclass
class StreamSpec:
    """Everything a worker needs to replay this rank's lanes (picklable, no open handles)."""

    shards: list[ShardInfo]
    lanes: list[list[dl.Segment]]
    starts: list[int]  # first lane copy each lane produces: 0, or where a resumed window begins
    plan: EpochPlan
    recipe: Recipe
    seed: int
    num_classes: int
    on_error: OnError = "raise"
    caches: list[str] = field(default_factory=list)  # whose targets each copy carries (cached mode)
    presence: str | None = None  # the cache whose rows say which samples phase 1 read
    cache_shards: list[int] | None = None  # cache shard index of each run shard
    lse_columns: list[list[int]] = field(default_factory=list)  # per cache, the logsumexp columns sent
    pairing: int = 1  # the repeats the cache's mixing pairs were drawn for (recipe.repeats)

    def lane_copies(self) -> list[int]:
        return [self.plan.repeats * sum(s.size for s in lane) for lane in self.lanes]


class _Rows:
    """A shard's cache rows for the epoch's views (every cache), read once while a lane is on that shard."""

    def __init__(self, caches: list[Cache], presence: Cache | None, views: Sequence[int]):
        self.caches, self.presence, self.views = caches, presence, views
        self.shard: int | None = None
        self.rows: list[dict[int, UnitData]] = []
        self.planned: np.ndarray | None = None  # which positions phase 1 read; None: no cache

    def load(self, cache_shard: int | None) -> None:
        if cache_shard is None or self.shard == cache_shard:
            return
        self.rows = [{v: c.read_view(v, cache_shard) for v in self.views} for c in self.caches]
        if self.presence is not None:
            first = self.rows[0][self.views[0]] if self.rows else self.presence.read_view(self.views[0], cache_shard)
            self.planned = np.asarray(first.labels) >= 0
        self.shard = cache_shard


class LaneStream(IterableDataset):
    """Yields a worker's lane as chunks of ``CHUNK`` lane slots: its copies and the slots' fates."""

    def __init__(self, spec: StreamSpec):
        self.spec = spec

    def __iter__(self) -> Iterator[dict[str, Any]]:
        spec = self.spec
        info = get_worker_info()
        lanes = [info.id] if info else list(range(len(spec.lanes)))
        caches = [open_cache(u) for u in spec.caches]  # opened in the worker, never forked
        presence = open_cache(spec.presence) if spec.presence else None
        totals = spec.lane_copies()
        for lane in lanes:
            rows = _Rows(caches, presence, spec.plan.views)
            chunk: list[tuple[int, View | str, dict | None]] = []
            for item in _lane(spec, lane, rows):
                chunk.append(item)
                index = item[0]
                if (index + 1) % dl.CHUNK == 0 or index + 1 == totals[lane]:
                    yield collate(chunk, lane)
                    chunk = []


def _lane(spec: StreamSpec, lane: int, rows: _Rows) -> Iterator[tuple[int, View | str, dict | None]]:
    """``(lane copy index, view or why it is skipped, targets)`` of every copy of the lane from its start."""
    repeats, index, start = spec.plan.repeats, 0, spec.starts[lane]
    for seg in spec.lanes[lane]:
        shard = spec.shards[seg.shard]
        samples = dl.lane_samples(seg, spec.seed, spec.plan, shard, spec.pairing)
        if index + repeats * len(samples) <= start:  # trained before a resume point: not even read
            index += repeats * len(samples)
            continue
        before = max(0, (start - index) // repeats)
        index += repeats * before
        for i, item in enumerate(_segment(spec, seg, shard, samples[before:], rows)):
            if index + i >= start:
                yield (index + i, *item)
        index += repeats * (len(samples) - before)


def _segment(
    spec: StreamSpec, seg: dl.Segment, shard: ShardInfo, samples: list[tuple[int, tuple[int, ...]]], rows: _Rows
) -> Iterator[tuple[View | str, dict | None]]:
    """Each sample's copies (``R`` per sample) in ``samples`` order, or why they are skipped."""
    rows.load(spec.cache_shards[seg.shard] if spec.cache_shards else None)
    needed = {p for _, pair in samples for p in pair}
    stats = SkipStats()
    stream = iter_decoded(shard, seg.shard, spec.num_classes, spec.on_error, stats, positions=needed)
    decoded: dict[int, DecodedSample] = {}
    made: dict[int, list[View]] = {}  # a partner's copies, made with its pair, waiting for its turn
    uses = Counter(q for _, pair in samples for q in pair)
    seen = -1  # every needed position up to here has been read (or found unreadable)
    try:
        for p, pair in samples:
            while seen < max(pair):
                s = next(stream, None)
                seen = shard.count if s is None else s.position
                if s is not None:
                    decoded[s.position] = s
            fate = _copies(spec, shard, p, pair, decoded, made, rows)
            for j in range(spec.plan.repeats):
                yield (fate, None) if isinstance(fate, str) else (fate[j], _targets(spec, shard, fate[j], rows))
            for q in pair:
                uses[q] -= 1
                if not uses[q]:
                    decoded.pop(q, None)
                    made.pop(q, None)
    finally:
        stream.close()


def _copies(
    spec: StreamSpec,
    shard: ShardInfo,
    p: int,
    pair: tuple[int, ...],
    decoded: dict[int, DecodedSample],
    made: dict[int, list[View]],
    rows: _Rows,
) -> list[View] | str:
    """The copies of sample ``p``, or why it is not trained (see the module docstring)."""
    planned = rows.planned
    if planned is not None and not planned[p]:
        return NOT_CACHED
    if p not in decoded:
        return UNREADABLE
    if p in made:
        return made.pop(p)
    partner = next((q for q in pair if q != p), None) if spec.recipe.mixes else None
    if partner is not None and planned is not None and not planned[partner]:
        partner = None  # phase 1 never read it: p was cached unmixed
    if partner is not None and partner not in decoded:
        if planned is not None:
            return PARTNER_UNREADABLE
        partner = None  # no cache: read now is all there is, as phase 1 would have done
    if partner is None:
        return pair_copies(decoded[p], None, spec.plan.views, spec.recipe, spec.seed, shard.name)[0]
    a, b = (decoded[pair[0]], decoded[pair[1]])
    copies_a, copies_b = pair_copies(a, b, spec.plan.views, spec.recipe, spec.seed, shard.name)
    mine, theirs = (copies_a, copies_b) if p == pair[0] else (copies_b, copies_a)
    made[partner] = theirs
    return mine


def _targets(spec: StreamSpec, shard: ShardInfo, v: View, rows: _Rows) -> dict[str, np.ndarray] | None:
    """The copy's cached targets from every cache, after checking that each row holds this very view."""
    if not rows.rows:
        return None
    out: dict[str, list[np.ndarray]] = {"t_values": [], "t_indices": [], "t_lse": []}
    for cache, by_view, columns in zip(rows.caches, rows.rows, spec.lse_columns, strict=True):
        row = by_view[v.view_id]
        _check_row(cache, shard, v, row)
        out["t_values"].append(row.values[v.position])
        out["t_indices"].append(row.indices[v.position])
        out["t_lse"].append(row.logsumexp[v.position][columns])
    width = max(len(x) for x in out["t_values"])
    return {
        "t_values": np.stack([np.pad(x.astype(np.float32), (0, width - len(x))) for x in out["t_values"]]),
        "t_indices": np.stack(
            [np.pad(x.astype(np.int64), (0, width - len(x)), constant_values=-1) for x in out["t_indices"]]
        ),
        "t_lse": np.stack(out["t_lse"]),
    }


def _check_row(cache: Cache, shard: ShardInfo, v: View, row: UnitData) -> None:
    """Key, label, image digest and (on the rows phase 1 chose) replayed pixels of one cache row."""
    p = v.position
    stored, label, digest = row.keys[p], row.labels[p], int(row.digests[p])
    if stored != v.key or label != v.label:
        raise CacheError(
            f"shard {shard.url!r} position {p}: cache {cache.url!r} row holds key {stored!r} label {label}, the "
            f"shard has key {v.key!r} label {v.label}; this cache was not built from these shards"
        )
    if digest and v.digest and digest != v.digest:
        raise CacheError(
            f"shard {shard.url!r} key {v.key!r}: its image bytes are not those the cache's teacher saw "
            f"(digest {v.digest:016x}, cache {digest:016x}); the shard was rebuilt: cache it again"
        )
    expected = int(row.pixel_digests[p, 0])
    if expected and checked_row(cache.meta.seed, cache.meta.views, v.view_id, shard.name, p):
        ours = pixel_digest(v.pixels)
        if ours != expected:
            where = f"shard {shard.url!r} key {v.key!r} view {v.view_id}"
            raise CacheError(replay_mismatch(cache.meta, where, ours, expected))


def collate(items: list[tuple[int, View | str, dict | None]], lane: int) -> dict[str, Any]:
    """One chunk of a lane: the copies sent (their lane copy index in ``copy``) and the ones skipped."""
    sent = [(i, v, t) for i, v, t in items if not isinstance(v, str)]
    views = [v for _, v, _ in sent]
    chunk: dict[str, Any] = {
        "lane": lane,
        "first": items[0][0],
        "stop": items[-1][0] + 1,
        "skipped": [(i, why) for i, why, _ in items if isinstance(why, str)],
        "copy": torch.tensor([i for i, _, _ in sent], dtype=torch.int64),
        "keys": [v.key for v in views],
    }
    if not views:
        return chunk
    chunk.update(
        pixels=stack_views([v.pixels for v in views]),
        label=torch.tensor([v.label for v in views]),
        mix_label=torch.tensor([v.mix_label for v in views]),
        lam=torch.tensor([v.lam for v in views], dtype=torch.float32),
        views=torch.tensor([v.view_id for v in views]),
    )
    if sent[0][2] is not None:
        for key in ("t_values", "t_indices", "t_lse"):
            chunk[key] = torch.from_numpy(np.stack([t[key] for _, _, t in sent]))
    return chunk


class WindowBatches:
    """One rank's batches of an epoch, assembled from its lanes' chunks window by window.

    The window's copies are put in the order :func:`pipeline.views.deal.window_order` gives; a skipped copy's
    slot takes a copy drawn (seeded) from the window's trained ones, so every batch has its size and every
    rank its steps. Started at ``first_step``, the copies of that window's earlier steps are dropped:
    they were trained before the checkpoint, and nothing before the window is read at all.
    """

    def __init__(
        self,
        chunks: Iterator[dict[str, Any]],
        spec: StreamSpec,
        window: int,
        batch_size: int,
        seed: int,
        first_step: int,
    ):
        self.chunks, self.spec, self.batch_size, self.seed = chunks, spec, batch_size, seed
        self.lane_copies = spec.lane_copies()
        self.windows = dl.windows(self.lane_copies, window)
        self.first_window, self.offset, _ = dl.resume_point(self.lane_copies, window, first_step, batch_size)
        self.held: dict[tuple[int, int], dict[str, Any]] = {}  # (lane, first copy) -> chunk
        self.where: dict[tuple[int, int], tuple[tuple[int, int], int]] = {}  # copy id -> (chunk, row)
        self.skipped: dict[tuple[int, int], str] = {}
        self.received = [s for s in spec.starts]
        self.first_step = first_step
        self.batch_counts: list[Counter] = []  # per batch yielded: its skipped copies by reason, "filled" slots

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            for w in range(self.first_window, len(self.windows)):
                order, why = self._order(w)
                if w == self.first_window:
                    order, why = order[self.offset :], why[self.offset :]
                for a in range(0, len(order), self.batch_size):
                    # Counted as the batch is handed out, so the account of the steps before a checkpoint is exact.
                    counts = Counter(x for x in why[a : a + self.batch_size] if x)
                    counts["filled"] = sum(counts.values())
                    self.batch_counts.append(counts)
                    yield self._gather(order[a : a + self.batch_size])
                self._release(w)
        finally:  # ended, failed or closed by a stopping run: the workers go now
            close_loader(self.chunks)

    def counts(self, until: int | None = None) -> Counter:
        """Skipped copies by reason and filled slots of the batches handed out for the steps before ``until``
        (every batch handed out by default), from this stream's first step on."""
        stop = None if until is None else max(until - self.first_step, 0)
        return sum(self.batch_counts[:stop], Counter())

    def _order(self, w: int) -> tuple[list[tuple[int, int]], list[str | None]]:
        """The window's copy ids in batch order, each skipped slot filled with a trained copy of the window,
        and for each slot why its planned copy was skipped (None: trained as planned)."""
        for lane, _, stop in self.windows[w]:
            while self.received[lane] < stop:
                self._take(fetch(self.chunks))
        order = dl.window_order(self.windows[w], self.spec.plan.repeats, stable_window_seed(self.seed, w))
        trained = [cid for cid in order if cid in self.where]
        if not trained:
            raise DataError(
                f"every copy of window {w} of this rank's epoch {self.spec.plan.epoch} is unreadable "
                f"({len(order)} copies: {dict(Counter(self.skipped[c] for c in order))}); is a whole shard broken?"
            )
        rng = random.Random(stable_window_seed(self.seed, w, "fill"))
        filled = []
        for cid in order:
            if cid in self.where:
                filled.append(cid)
            else:
                filled.append(trained[rng.randrange(len(trained))])
        return filled, [None if cid in self.where else self.skipped[cid] for cid in order]

    def _take(self, chunk: dict[str, Any]) -> None:
        lane, key = chunk["lane"], (chunk["lane"], chunk["first"])
        self.held[key] = chunk
        for row, copy in enumerate(chunk["copy"].tolist()):
            self.where[(lane, copy)] = (key, row)
        for copy, why in chunk["skipped"]:
            self.skipped[(lane, copy)] = why
        self.received[lane] = chunk["stop"]

    def _gather(self, slots: list[tuple[int, int]]) -> dict[str, Any]:
        rows = [self.where[cid] for cid in slots]
        first = self.held[rows[0][0]]
        out: dict[str, Any] = {"keys": [self.held[k]["keys"][r] for k, r in rows]}
        for key in first:
            if key in ("lane", "first", "stop", "skipped", "copy", "keys"):
                continue
            parts = [self.held[k][key][r : r + 1] for k, r in rows]
            out[key] = join_batches(parts) if key == "pixels" else torch.cat(parts)
        return out

    def _release(self, w: int) -> None:
        """Drop the chunks no later window needs (their last copy is in window ``w`` or before)."""
        bound = {lane: stop for lane, _, stop in self.windows[w]}
        for key in [k for k, c in self.held.items() if c["stop"] <= bound.get(k[0], -1)]:
            chunk = self.held.pop(key)
            for copy in chunk["copy"].tolist():
                self.where.pop((chunk["lane"], copy), None)
            for copy, _ in chunk["skipped"]:
                self.skipped.pop((chunk["lane"], copy), None)


def stable_window_seed(seed: int, window: int, *more: object) -> int:
    return stable_seed("window", seed, window, *more)


def epoch_batches(
    spec: StreamSpec, batch_size: int, window: int, seed: int, first_step: int = 0, pin_memory: bool = False
) -> WindowBatches:
    """This rank's batches of the epoch from ``first_step`` on (one loader worker per lane)."""
    lanes = len(spec.lanes)
    _, _, spec.starts = dl.resume_point(spec.lane_copies(), window, first_step, batch_size)
    spec.starts = [s - s % dl.CHUNK for s in spec.starts]
    workers = lanes if lanes > 1 else 0
    # Workers run up to about a window ahead: the window being drawn from is never waited for.
    prefetch = math.ceil(window / (max(lanes, 1) * dl.CHUNK)) + 2
    loader = DataLoader(
        LaneStream(spec),
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch if workers else None,
        worker_init_fn=worker_signals,
    )
    return WindowBatches(iter(loader), spec, window, batch_size, seed, first_step)
