"""Matching a cache to a training run: same recipe and seed, every shard and unit there, intact."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from pipeline.cache.access import REDO, Cache
from pipeline.cache.damage import missing_objects
from pipeline.cache.meta import check_versions, diff_fields
from pipeline.errors import CacheError
from pipeline.shards.lists import ShardInfo


def check_run(
    cache: Cache, shards: Sequence[ShardInfo], recipe: dict[str, Any], seed: int, views: Iterable[int]
) -> list[int]:
    """Refuse a cache that does not match a training run, lacks a unit it needs or lost a stored object.

    Args:
        shards: The run's shards (names and counts must be in the cache).
        recipe: The run's augmentation recipe; seed: its view seed.
        views: Every view the run will read.

    Returns:
        The cache's shard index of each of ``shards``.

    Raises:
        CacheError: naming the differing field, the missing shard or the missing/damaged units.
    """
    diffs = diff_fields({"recipe": recipe, "seed": seed}, {"recipe": cache.meta.recipe, "seed": cache.meta.seed})
    if diffs:
        raise CacheError(f"cache {cache.url!r} does not match this training run: {'; '.join(diffs)}")
    by_name = {s.name: (i, s.count) for i, s in enumerate(cache.meta.shards)}
    rows = []
    for s in shards:
        if s.name not in by_name:
            raise CacheError(f"shard {s.name!r} ({s.url}) is not in cache {cache.url!r}; cache-teacher it first")
        i, n = by_name[s.name]
        if n != s.count:
            raise CacheError(f"shard {s.name!r} has {s.count} samples but cache {cache.url!r} recorded {n}")
        rows.append(i)
    blocks = sorted({cache.meta.block_of(v) for v in views})
    missing = cache.missing_units(blocks, sorted(set(rows)))
    if missing:
        raise CacheError(
            f"cache {cache.url!r} is incomplete: {len(missing)} unit(s) this run needs are missing: "
            f"{_some(cache, missing)}; run cache-teacher again to finish it"
        )
    # Cheap (a listing): a lost object fails the run now, not at the epoch that reads it.
    damaged = missing_objects(cache, [(b, s) for b in blocks for s in sorted(set(rows))])
    if damaged:
        raise CacheError(
            f"cache {cache.url!r} is damaged: {len(damaged)} unit(s) this run needs lost stored objects: "
            f"{_some(cache, list(damaged), damaged)}; {REDO}"
        )
    check_versions(cache.meta)
    return rows


def _some(cache: Cache, units: list[tuple[int, int]], why: dict[tuple[int, int], list[str]] | None = None) -> str:
    """The first units of a list, described (with what each lacks), and how many more."""
    parts = [
        cache.meta.describe_unit(b, s) + (f" ({', '.join(why[(b, s)])} missing)" if why else "") for b, s in units[:8]
    ]
    more = f" and {len(units) - 8} more (see stillroom cache-status)" if len(units) > 8 else ""
    return ", ".join(parts) + more
