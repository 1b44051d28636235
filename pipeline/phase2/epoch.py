"""One rank's epoch of phase 2: its share of the plan (:mod:`pipeline.views.deal`), its steps, its batches from a
given step on, and the account of what it trained (planned, padded, skipped, filled copies)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.errors import WorkerError
from pipeline.interrupt import StopSignals
from pipeline.phase2.distributed import Dist, all_sum
from pipeline.phase2.inputs import RunData
from pipeline.phase2.lanes import NOT_CACHED, PARTNER_UNREADABLE, UNREADABLE, StreamSpec, WindowBatches, epoch_batches
from pipeline.seeding import stable_seed
from pipeline.train_options import TrainConfig
from pipeline.views import deal as dl

log = logging.getLogger(__name__)

# The order of the copy account in the all-reduce and in the metrics.
ACCOUNT = ("planned", "padded", "filled", UNREADABLE, PARTNER_UNREADABLE, NOT_CACHED)


@dataclass
class RankEpoch:
    """Rank ``dist.rank``'s part of one epoch."""

    data: RunData
    cfg: TrainConfig
    dist: Dist
    epoch: int
    run_seed: int
    cache_shards: list[int] | None

    def __post_init__(self) -> None:
        self.plan = self.data.plan(self.epoch)
        self.deal = dl.deal(self.data.shards, self.plan, self.data.seed, self.dist.world)
        self.segments = self.deal.segments(self.dist.rank)
        self.batches: WindowBatches | None = None

    @property
    def steps(self) -> int:
        """Steps of this epoch, the same on every rank (from shard counts alone)."""
        steps = self.deal.steps(self.cfg.batch_size)
        return min(steps, self.cfg.max_steps_per_epoch) if self.cfg.max_steps_per_epoch else steps

    def stream(self, first_step: int, target_tau: float | None, pin_memory: bool) -> WindowBatches:
        """The batches from ``first_step`` on; nothing before its window is read."""
        cfg, data = self.cfg, self.data
        caches = data.caches if cfg.cached else []
        spec = StreamSpec(
            shards=data.shards,
            lanes=dl.split_lanes(self.segments, max(cfg.workers, 1)),
            starts=[],
            plan=self.plan,
            recipe=data.recipe,
            seed=data.seed,
            num_classes=data.num_classes,
            on_error=cfg.on_error,  # type: ignore[arg-type]
            caches=[c.url for c in caches],
            presence=data.cache.url if data.cache else None,
            cache_shards=self.cache_shards,
            lse_columns=[[0, list(c.meta.temperatures).index(target_tau)] if target_tau else [] for c in caches],
            pairing=data.recipe.repeats,
        )
        window = dl.window_size(cfg.shuffle_buffer, cfg.batch_size)
        seed = stable_seed("batches", self.run_seed, self.epoch, self.dist.rank)
        self.batches = epoch_batches(spec, cfg.batch_size, window, seed, first_step, pin_memory)
        return self.batches

    def skips(
        self, device: torch.device, carried: dict[str, int] | None = None, until: int | None = None
    ) -> dict[str, int]:
        """Filled slots and skipped copies by reason over every rank, of the steps before ``until`` (all of
        this stream's by default), plus ``carried``: those of the steps trained before a mid-epoch resume,
        which the checkpoint holds. A collective: every rank calls it."""
        return self._summed(self._counts(carried, until), ACCOUNT[2:], device)

    def account(self, device: torch.device, carried: dict[str, int] | None = None) -> dict[str, Any]:
        """Copies of the epoch over every rank: the plan's, padding, skipped by reason, filled slots (those
        before a mid-epoch resume, ``carried``, included)."""
        mine = {
            "planned": self.plan.repeats * sum(s.size for s in self.segments if not s.padding),
            "padded": self.plan.repeats * sum(s.size for s in self.segments if s.padding),
            **self._counts(carried, None),
        }
        out: dict[str, Any] = self._summed(mine, ACCOUNT, device)
        skipped = {k: out.pop(k) for k in ACCOUNT[3:]}
        return {**out, "skipped": {k: v for k, v in skipped.items() if v}}

    def _counts(self, carried: dict[str, int] | None, until: int | None) -> Counter:
        counts: Counter = Counter(self.batches.counts(until) if self.batches else {})
        if self.dist.rank == 0:  # the checkpoint's counts are every rank's already: added once
            counts.update(carried or {})
        return counts

    def _summed(self, mine: dict[str, int], keys: tuple[str, ...], device: torch.device) -> dict[str, int]:
        total = all_sum(torch.tensor([float(mine.get(k, 0)) for k in keys], device=device), self.dist).tolist()
        return {k: int(v) for k, v in zip(keys, total, strict=True)}


def noise_seed(run_seed: int, rank: int, epoch: int, step: int) -> int:
    """The seed of torch's RNG for one step (drop path and any other noise of the forward pass): a function of
    the position alone, so a resumed run draws what the uninterrupted one drew, on every rank."""
    return stable_seed("noise", run_seed, rank, epoch, step)


def next_batch(
    batches: Iterator[dict[str, Any]], stop: StopSignals | None
) -> tuple[dict[str, Any] | None, WorkerError | None]:
    """The next batch, or ``(None, None)`` when the loader failed after a stop signal (a batch system's SIGTERM
    reaches the workers too), or ``(None, why)`` when a loader worker died, or was sent SIGTERM alone (no
    signal here; :func:`pipeline.interrupt.fetch` tells): either way, stop here. Without ``stop`` (a loop of
    the user's own, which handles signals itself) every failure is raised."""
    received = stop.received if stop is not None else None
    try:
        batch = next(batches, None)
    except Exception as e:
        received = stop.received if stop is not None else None  # read after the failure: handled by then
        if received is None:
            if stop is not None and isinstance(e, WorkerError):
                return None, e
            raise
        log.warning("the data loader stopped after signal %d; stopping at this step", received)
        return None, None
    if batch is None and received is None:
        raise RuntimeError(
            "the epoch's batches ended before its steps: a bug in pipeline.views.deal or pipeline.phase2.lanes"
        )
    return batch, None
