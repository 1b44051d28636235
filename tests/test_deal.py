"""Balanced data-parallel epochs (pipeline.views.deal), simulated from shard counts alone: every planned copy is
trained at any world size, every rank takes the same number of steps, padding is a few repeated copies
and counted, and a resumed epoch draws exactly the batches the uninterrupted one drew."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from pipeline.shards.lists import ShardInfo
from pipeline.views import deal as dl
from pipeline.views.plans import epoch_plan, group_size

# ImageNet's training split as stillroom pack writes it: 1,281 shards of 1,000 and one of 167.
IMAGENET = [ShardInfo(f"train-{i:06d}.tar", 1000) for i in range(1281)] + [ShardInfo("train-001281.tar", 167)]
ONE_SHARD = [ShardInfo("train-000000.tar", 1000)]


def rank_copies(shards: list[ShardInfo], epoch: int, repeats: int, world: int) -> tuple[dl.EpochDeal, list[int]]:
    plan = epoch_plan(epoch, repeats, 300)
    d = dl.deal(shards, plan, seed=0, world=world)
    return d, [repeats * sum(s.size for s in d.segments(r)) for r in range(world)]


@pytest.mark.parametrize("world", [1, 2, 4, 8, 64, 256])
@pytest.mark.parametrize("repeats", [1, 3])
def test_every_rank_trains_the_same_steps_and_the_whole_plan_on_imagenet(world: int, repeats: int) -> None:
    for epoch in (0, 1, 5):
        d, copies = rank_copies(IMAGENET, epoch, repeats, world)
        planned = repeats * sum(group_size(s.count, repeats, epoch % repeats) for s in IMAGENET)
        assert len(set(copies)) == 1, "every rank has the same number of copies"
        assert len({d.steps(128)} | {math.ceil(c / 128) for c in copies}) == 1, "and so the same steps"
        trained = sum(copies)
        assert trained >= planned, "nothing the plan names is dropped"
        assert trained - planned == repeats * d.padding and d.padding < world, "padding: under one sample per rank"
        # The segments cover the epoch's sample sequence exactly once, plus the padding.
        covered: Counter = Counter()
        for r in range(world):
            for seg in d.segments(r):
                if not seg.padding:
                    covered[seg.shard] += seg.size
        assert covered == Counter({s: d.sizes[s] for s in d.order})


@pytest.mark.parametrize("world", [1, 2, 4, 8, 64, 256])
def test_more_ranks_than_shards_still_train_the_whole_plan(world: int) -> None:
    d, copies = rank_copies(ONE_SHARD, 0, 1, world)
    assert len(set(copies)) == 1 and sum(copies) >= 1000 and d.padding == math.ceil(1000 / world) * world - 1000
    # a rank reads only the part of the shard it trains (and the partners of its cut pairs)
    parts = [sum(s.size for s in d.segments(r) if not s.padding) for r in range(world)]
    assert sum(parts) == 1000 and max(parts) == math.ceil(1000 / world)


def test_the_plan_does_not_depend_on_world_size() -> None:
    """Which samples an epoch trains is the plan's; the world only cuts it into ranks."""
    for repeats in (1, 3):
        whole = dl.deal(IMAGENET[:20], epoch_plan(4, repeats, 300), 0, 1)
        reference = [(s.shard, s.start, s.stop) for s in whole.segments(0)]
        for world in (2, 3, 8):
            d = dl.deal(IMAGENET[:20], epoch_plan(4, repeats, 300), 0, world)
            flat = [
                (s.shard, i)
                for r in range(world)
                for s in d.segments(r)
                if not s.padding
                for i in range(s.start, s.stop)
            ]
            assert flat == [(sh, i) for sh, a, b in reference for i in range(a, b)]


def test_lanes_cut_a_rank_into_equal_contiguous_parts() -> None:
    d = dl.deal(IMAGENET[:30], epoch_plan(0, 3, 300), 0, 4)
    segs = d.segments(2)
    for lanes in (1, 3, 10):
        parts = dl.split_lanes(segs, lanes)
        sizes = [sum(s.size for s in p) for p in parts]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == sum(s.size for s in segs)
        flat = [(s.shard, i) for p in parts for s in p for i in range(s.start, s.stop)]
        assert flat == [(s.shard, i) for s in segs for i in range(s.start, s.stop)]


def test_windows_shuffle_whole_samples_and_cover_every_copy_once() -> None:
    lane_copies, repeats = [3 * 57, 3 * 56, 3 * 56], 3
    ws = dl.windows(lane_copies, 96)
    seen = []
    for w, window in enumerate(ws):
        order = dl.window_order(window, repeats, seed=w)
        assert len(order) == sum(b - a for _, a, b in window) <= 96
        seen += order
        # a sample's copies are adjacent in the draw order (so in the same or the next batch)
        positions: dict[tuple[int, int], list[int]] = {}
        for i, (lane, c) in enumerate(order):
            positions.setdefault((lane, c // repeats), []).append(i)
        assert all(max(p) - min(p) == len(p) - 1 for p in positions.values())
    assert sorted(seen) == sorted((lane, c) for lane, n in enumerate(lane_copies) for c in range(n))


@pytest.mark.parametrize("step", [0, 1, 5, 6, 11, 15])
def test_a_resumed_epoch_draws_the_batches_of_the_uninterrupted_one(step: int) -> None:
    """The resume point needs no data: the window of the step, its trained part, where each lane restarts."""
    lane_copies, size, batch = [3 * 40, 3 * 39], 48, 16
    ws = dl.windows(lane_copies, size)
    whole = [cid for w, window in enumerate(ws) for cid in dl.window_order(window, 3, seed=w)]
    w, offset, firsts = dl.resume_point(lane_copies, size, step, batch)
    resumed = [cid for v, window in enumerate(ws[w:], start=w) for cid in dl.window_order(window, 3, seed=v)]
    assert resumed[offset:] == whole[step * batch :]
    # nothing a lane produced before the resumed window is needed again
    assert all(c >= firsts[lane] for lane, c in resumed)


def test_lane_order_completes_pairs_as_the_tar_streams() -> None:
    shard = ShardInfo("train-000000.tar", 100)
    plan = epoch_plan(2, 3, 30)
    d = dl.deal([shard], plan, 0, 1)
    (seg,) = d.segments(0)
    samples = dl.lane_samples(seg, 0, plan, shard, pairing=3)
    assert sorted(p for p, _ in samples) == sorted(p for item in dl.epoch_items(plan, 0, shard, 3) for p in item)
    done = [max(pair) for _, pair in samples]
    assert done == sorted(done), "each sample is emitted once its pair's later member has been read"
    pairs = [pair for _, pair in samples if len(pair) == 2]
    assert all(p in pair for p, pair in samples) and len(set(pairs)) * 2 == len(pairs)
