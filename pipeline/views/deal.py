"""Dealing an epoch's copies to ranks and lanes, and the order in which batches draw them.

Everything here is computed from shard counts and seeds alone, never from data, so that every rank
agrees on its share without talking to the others, and a resumed run knows which copies its trained
steps held without decoding them.

* **The epoch's sample sequence.** The epoch plan (:mod:`pipeline.views.plans`) trains one RA group of
  every shard. The groups are taken in a seeded order of the shards (new every epoch); within a group,
  samples come in mixing-pair order (:func:`pipeline.views.mixing.group_sequence`: the two members of a pair
  side by side, an odd one out last). A pair is self-contained (its members mix only with each other
  for all ``R`` views of the epoch), so any cut of this sequence leaves at most one pair split.
* **Ranks.** The sequence of ``n`` samples is cut into ``world`` contiguous ranges of ``t = ceil(n /
  world)`` samples; the last ranges wrap around to the start (DeiT's padding: at most ``world - 1``
  samples repeated, counted). Every rank trains ``R * t`` copies in ``ceil(R * t / batch)`` steps: the
  same number of steps on every rank, the whole plan at any world size, even with more ranks than shards.
* **Lanes.** A rank's range is cut again into ``lanes`` contiguous parts of equal size (one per
  loader worker). A lane emits its samples' copies (``R`` each, in view order) segment by segment, in
  the order their pairs complete while the shard's tar is streamed (:func:`lane_samples`).
* **Windows.** The rank's copy stream interleaves its lanes ``CHUNK`` copies at a time (the loader's
  round robin over its workers). It is cut into windows of ``window`` copies (a multiple of the batch);
  inside a window the samples' runs of copies are shuffled (seeded by epoch, rank and window), and
  batches are consecutive slices. A step therefore lies in one window: a resumed run replays only the
  window it stopped in (:func:`resume_point`), never the steps before it.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pipeline.seeding import stable_seed
from pipeline.shards.lists import ShardInfo
from pipeline.views.mixing import group_sequence
from pipeline.views.plans import EpochPlan, group_size

CHUNK = 32  # copies per loader message: few, large messages


@dataclass(frozen=True)
class Segment:
    """Samples ``[start, stop)`` of one shard's group sequence in an epoch; ``padding``: repeated ones."""

    shard: int  # index into the run's shard list
    start: int
    stop: int
    padding: bool = False

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class EpochDeal:
    """One epoch's deal: the shard order, group sizes and the samples every rank trains."""

    plan: EpochPlan
    order: tuple[int, ...]  # shard indices, in the epoch's order
    sizes: tuple[int, ...]  # group size of each shard (indexed by shard)
    world: int

    @property
    def samples(self) -> int:
        """Samples the plan trains this epoch (``n``)."""
        return sum(self.sizes)

    @property
    def per_rank(self) -> int:
        """Samples each rank trains (``t``): the plan's share, rounded up."""
        return max(1, math.ceil(self.samples / self.world))

    @property
    def padding(self) -> int:
        """Samples trained twice so that every rank trains ``t`` (at most ``world - 1``)."""
        return self.per_rank * self.world - self.samples

    def copies_per_rank(self) -> int:
        return self.plan.repeats * self.per_rank

    def steps(self, batch_size: int) -> int:
        """Steps of every rank: its copies in batches, the last one possibly smaller."""
        return math.ceil(self.copies_per_rank() / batch_size)

    def segments(self, rank: int) -> list[Segment]:
        """The contiguous samples of the epoch's sequence that ``rank`` trains, wrapping past the end."""
        n, t = self.samples, self.per_rank
        bounds = [0]
        for s in self.order:
            bounds.append(bounds[-1] + self.sizes[s])
        out: list[Segment] = []
        lo, hi = rank * t, (rank + 1) * t
        while lo < hi:
            at = lo % n
            i = bisect.bisect_right(bounds, at) - 1
            take = min(hi - lo, bounds[i + 1] - at)
            out.append(Segment(self.order[i], at - bounds[i], at - bounds[i] + take, padding=lo >= n))
            lo += take
        return out


def deal(shards: Sequence[ShardInfo], plan: EpochPlan, seed: int, world: int) -> EpochDeal:
    """The epoch's deal over ``world`` ranks (from shard counts and seeds alone)."""
    order = list(range(len(shards)))
    random.Random(stable_seed("shard-order", seed, plan.epoch)).shuffle(order)
    sizes = tuple(group_size(s.count, plan.repeats, plan.group) for s in shards)  # == len(epoch_items(...)) flat
    order = [s for s in order if sizes[s]]
    return EpochDeal(plan, tuple(order), sizes, world)


def split_lanes(segments: Sequence[Segment], lanes: int) -> list[list[Segment]]:
    """Cut a rank's segments into ``lanes`` contiguous parts whose sizes differ by at most one sample."""
    total = sum(s.size for s in segments)
    lanes = max(1, min(lanes, total))
    out: list[list[Segment]] = [[] for _ in range(lanes)]
    lane, room = 0, total // lanes + (total % lanes > 0)
    for seg in segments:
        start = seg.start
        while start < seg.stop:
            take = min(room, seg.stop - start)
            out[lane].append(Segment(seg.shard, start, start + take, seg.padding))
            start += take
            room -= take
            if room == 0 and lane + 1 < lanes:
                lane += 1
                room = total // lanes + (lane < total % lanes)
    return out


def epoch_items(plan: EpochPlan, seed: int, shard: ShardInfo, pairing: int) -> list[tuple[int, ...]]:
    """The pairs (and odd ones out) of ``shard`` that ``plan``'s epoch trains, in sequence order.

    Pairs are drawn for the cache's repeats (``pairing``, :func:`pipeline.views.mixing.group_sequence`); an
    epoch with repeats trains one of its groups, an epoch without (``--repeats 1`` on any cache) trains
    every group, one after the other.
    """
    if plan.repeats == pairing:
        block, groups = plan.block, [plan.group]
    else:  # plan.repeats == 1: every sample, paired as the cache's block of this view pairs them
        block, groups = plan.views[0] // pairing, list(range(pairing))
    items: list[tuple[int, ...]] = []
    for g in groups:
        seq = group_sequence(seed, block, shard.name, shard.count, pairing, g)
        items += [tuple(seq[i : i + 2]) for i in range(0, len(seq), 2)]
    return items


def lane_samples(
    segment: Segment, seed: int, plan: EpochPlan, shard: ShardInfo, pairing: int
) -> list[tuple[int, tuple[int, ...]]]:
    """``(position, its pair)`` of a segment's samples, in the order the lane emits them.

    That is the order in which their pairs complete while the shard's tar is streamed (the later member's
    position, then the place in the sequence), so a worker emits each pair as soon as it has read both
    members, holding only the samples whose partner is still to come. A pair is given in its own order
    (``(a, b)``: the order its mixing draws are seeded with), or ``(p,)`` for one alone.
    """
    flat = [(p, item) for item in epoch_items(plan, seed, shard, pairing) for p in item]
    mine = [(max(item), i, p, item) for i, (p, item) in enumerate(flat[segment.start : segment.stop])]
    mine.sort()
    return [(p, item) for _, _, p, item in mine]


# ---------------------------------------------------------------------------------------------------
# The rank's copy stream, its windows and the order batches draw from them


def interleave(lane_copies: Sequence[int]) -> Iterator[tuple[int, int, int]]:
    """``(lane, first, stop)`` chunks of the rank's stream: ``CHUNK`` copies of each lane in turn."""
    done = [0] * len(lane_copies)
    while True:
        moved = False
        for lane, total in enumerate(lane_copies):
            if done[lane] < total:
                stop = min(done[lane] + CHUNK, total)
                yield lane, done[lane], stop
                done[lane], moved = stop, True
        if not moved:
            return


def window_size(shuffle_buffer: int, batch_size: int) -> int:
    """Copies per window: ``--shuffle-buffer`` rounded down to whole batches (at least one)."""
    return max(1, shuffle_buffer // batch_size) * batch_size


def windows(lane_copies: Sequence[int], size: int) -> list[list[tuple[int, int, int]]]:
    """The rank's stream cut into windows of ``size`` copies: each a list of ``(lane, first, stop)``."""
    out: list[list[tuple[int, int, int]]] = [[]]
    room = size
    for lane, first, stop in interleave(lane_copies):
        while first < stop:
            if room == 0:
                out.append([])
                room = size
            take = min(room, stop - first)
            out[-1].append((lane, first, first + take))
            first += take
            room -= take
    return out if out[0] else []


def window_order(window: Sequence[tuple[int, int, int]], repeats: int, seed: int) -> list[tuple[int, int]]:
    """The ``(lane, copy)`` ids of a window in the order batches draw them: runs of one sample's copies
    (``copy // repeats``), shuffled whole, so a sample's copies land in the same or the next batch."""
    runs: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for lane, first, stop in window:
        for c in range(first, stop):
            runs.setdefault((lane, c // repeats), []).append((lane, c))
    keys = list(runs)
    random.Random(seed).shuffle(keys)
    return [cid for k in keys for cid in runs[k]]


def resume_point(lane_copies: Sequence[int], size: int, step: int, batch_size: int) -> tuple[int, int, list[int]]:
    """Where step ``step`` starts: ``(window, copies of that window already trained, first copy of each
    lane that the loader must produce again)``. Windows are whole batches, so a step lies in one."""
    ws = windows(lane_copies, size)
    index = step * batch_size // size
    firsts = list(lane_copies)  # a lane with nothing left starts past its end
    for lane, first, _ in (chunk for w in ws[index:] for chunk in w):
        firsts[lane] = min(firsts[lane], first)
    return index, step * batch_size - index * size, firsts
