"""Which samples an epoch trains and which cached views their copies use (DeiT's repeated augmentation).

Content-addressed like the views themselves: everything here depends on ``(seed, epoch, shard,
position)`` and the shard's sample count only, never on rank, world size, worker or resume point.

With ``R`` repeats, the views are cut into blocks of ``R`` consecutive views (``V`` must be a
multiple of ``R``). For block ``b``, a seeded permutation of a shard's positions deals them into ``R``
groups. Epoch ``e`` trains group ``e % R`` of block ``(e // R) mod (V / R)``, each of its samples ``R``
times, once with each view of the block. So an epoch covers ``1/R`` of the samples with the same number
of copies (steps) as an epoch without repeats, every sample is trained exactly once in every ``R``
epochs, and a sample uses all ``V`` views before any view repeats (after ``V`` epochs). ``R = 1`` is one
group and one view: every sample, view ``e mod V``.

Mixup/CutMix partners of view ``v`` are drawn within the groups of block ``v // R``
(:mod:`pipeline.views.mixing`), so every partner of a trained copy is trained in the same epoch with the same
view: phase 2 decodes only the ``1/R`` of each shard it trains, once, for all ``R`` copies.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.partition import my_share
from pipeline.seeding import shuffled, stable_seed
from pipeline.shards.lists import ShardInfo


@dataclass(frozen=True)
class EpochPlan:
    """What one epoch trains: group ``group`` of RA block ``block``, with ``views`` (one per copy)."""

    epoch: int
    repeats: int
    block: int
    group: int
    views: tuple[int, ...]


def epoch_plan(epoch: int, repeats: int, num_views: int) -> EpochPlan:
    """The RA block, group and views of ``epoch`` for a cache of ``num_views`` views."""
    blocks = max(num_views // repeats, 1)
    block = (epoch // repeats) % blocks
    views = tuple(block * repeats + j for j in range(repeats))
    return EpochPlan(epoch=epoch, repeats=repeats, block=block, group=epoch % repeats, views=views)


def groups(seed: int, block: int, shard: str, count: int, repeats: int) -> list[int]:
    """The RA group of every position ``0 .. count-1`` of ``shard`` in RA block ``block``."""
    group = [0] * count
    if repeats > 1:
        for i, position in enumerate(shuffled(count, "ra-groups", seed, block, shard)):
            group[position] = i % repeats
    return group


def group_size(count: int, repeats: int, group: int) -> int:
    """Samples of a ``count``-sample shard in ``group``: computable without the shard's data."""
    return len(range(group, count, repeats))


def covered(plan: EpochPlan, seed: int, shard: ShardInfo) -> list[int]:
    """Positions of ``shard`` that ``plan``'s epoch trains (all of them when ``repeats == 1``)."""
    if plan.repeats == 1:
        return list(range(shard.count))
    g = groups(seed, plan.block, shard.name, shard.count, plan.repeats)
    return [p for p in range(shard.count) if g[p] == plan.group]


def rank_shards(shards: Sequence[ShardInfo], epoch: int, seed: int, rank: int, world: int) -> list[int]:
    """Indices (into ``shards``) that ``rank`` reads in ``epoch``: disjoint across ranks."""
    order = list(range(len(shards)))
    random.Random(stable_seed("shard-order", seed, epoch)).shuffle(order)
    return my_share(order, rank, world)


def steps_per_epoch(shards: Sequence[ShardInfo], plan: EpochPlan, seed: int, world: int, batch_size: int) -> int:
    """Batches every rank yields in the epoch: the smallest rank's full batches of copies."""
    per_rank = [
        sum(plan.repeats * group_size(shards[i].count, plan.repeats, plan.group) for i in ids)
        for ids in (rank_shards(shards, plan.epoch, seed, r, world) for r in range(world))
    ]
    return min(per_rank) // batch_size
