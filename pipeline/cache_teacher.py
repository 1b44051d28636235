"""Phase 1: run the teacher over replayed views once and store top-k logits in the cache.

Work is split into units (view block x shard). DataLoader workers each take whole units: they
read the shard once, decode every image once, and replay every view of the block from it. The
main process runs the frozen teacher, keeps one buffer per unit in flight, and writes a unit's
chunks and then its completion marker when the worker reports the unit finished. Re-running skips
finished units; a unit cut short by a crash has no marker and is redone from scratch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import storage
from .cache import Cache, CacheMeta, UnitData, create_or_open
from .config import finish
from .errors import ConfigError
from .models import autocast, checkpoint_num_classes, load_teacher, resolve_device, topk_targets
from .options import CacheConfig
from .partition import job_slot, my_share
from .progress import progress_bar
from .recipe import Recipe, make_recipe
from .replay import replay_shard
from .shards import OnError, ShardInfo, SkipStats, iter_decoded, load_shard_list, num_classes_from_sidecar

log = logging.getLogger(__name__)


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
        pending: list = []
        positions: set[int] = set()
        for window in replay_shard(samples, views, self.recipe, self.meta.seed, shard.name):
            pending.extend(window)
            positions.update(v.position for v in window)
            while len(pending) >= self.batch_size:
                yield self._batch(block, s, pending[: self.batch_size])
                pending = pending[self.batch_size :]
        if pending:
            yield self._batch(block, s, pending)
        yield {"unit": (block, s), "end": True, "count": len(positions), "skipped": dict(stats.reasons)}

    @staticmethod
    def _batch(block: int, s: int, views: list) -> dict[str, Any]:
        return {
            "unit": (block, s),
            "end": False,
            "pixels": torch.stack([v.pixels for v in views]),
            "position": torch.tensor([v.position for v in views]),
            "view": torch.tensor([v.view for v in views]),
            "label": torch.tensor([v.label for v in views]),
            "keys": [v.key for v in views],
        }


@dataclass
class Phase1:
    """A resolved phase-1 job: the cache it fills, its teacher and the data it reads."""

    cfg: CacheConfig
    cache: Cache
    teacher: torch.nn.Module
    shards: list[ShardInfo]
    recipe: Recipe
    device: torch.device
    summary: dict[str, Any] = field(default_factory=dict)


def build_teacher(cfg: CacheConfig, num_classes: int, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """Frozen teacher in eval mode wrapped with its normalisation, and its identity for the cache."""
    if not cfg.teacher_checkpoint and not cfg.teacher_pretrained:
        raise ConfigError("cache-teacher needs --teacher-checkpoint FILE (or --teacher-pretrained with a model hub)")
    model, built = load_teacher(
        cfg.teacher, num_classes, cfg.teacher_checkpoint, device, cfg.teacher_kwargs, cfg.teacher_pretrained
    )
    if device.type == "cuda" and cfg.compile:
        model = torch.compile(model)
    digest = storage.sha256_file(cfg.teacher_checkpoint) if cfg.teacher_checkpoint else "pretrained"
    return model, {"name": cfg.teacher, "checkpoint_sha256": digest, **built}


def _num_classes(cfg: CacheConfig, shards: list[ShardInfo]) -> int:
    """--num-classes, else the pack sidecar's, else the teacher checkpoint's classifier size."""
    num_classes = cfg.num_classes or num_classes_from_sidecar(shards[0].url)
    if not num_classes:
        num_classes = checkpoint_num_classes(cfg.teacher, cfg.teacher_checkpoint, cfg.teacher_pretrained)
        if num_classes:
            log.info("%d classes: the teacher classifier's output size (no --num-classes, no sidecar)", num_classes)
    if not num_classes:
        raise ConfigError(
            "number of classes unknown: pass --num-classes (no pack sidecar next to the shards, and the "
            "teacher checkpoint does not show its classifier)"
        )
    if cfg.topk > num_classes:
        raise ConfigError(f"--topk {cfg.topk} is larger than the number of classes ({num_classes})")
    return num_classes


def _capacity(cfg: CacheConfig, shards: list[ShardInfo]) -> int:
    largest = max(shards, key=lambda s: s.count)
    capacity = cfg.capacity or largest.count
    if capacity < largest.count:
        raise ConfigError(f"--capacity {capacity} is smaller than shard {largest.url!r} ({largest.count} samples)")
    return capacity


def prepare(cfg: CacheConfig) -> Phase1:
    """Resolve shards, teacher and recipe; create or reopen the cache (refusing a mismatch)."""
    shards = load_shard_list(cfg.shards, label_key=cfg.label_key)
    # An unreachable cache store must fail here, in one line, not in cache creation's wait for other jobs.
    storage.exists(cfg.out)
    num_classes = _num_classes(cfg, shards)
    recipe = make_recipe(cfg.recipe, cfg.img_size)
    device = resolve_device(cfg.device)
    teacher, ident = build_teacher(cfg, num_classes, device)
    ident["input_size"] = recipe.img_size
    meta = CacheMeta.build(
        shards=shards,
        num_classes=num_classes,
        capacity=_capacity(cfg, shards),
        topk=cfg.topk,
        temperatures=tuple(float(t) for t in cfg.temperatures),
        views=cfg.views,
        view_block=cfg.view_block,
        seed=cfg.seed,
        recipe=recipe.to_dict(),
        teacher=ident,
        # Not part of the fingerprint, but CPU kernels may round differently at another batch size, so
        # a unit redone with another batch size can differ from its first writing in the last bits.
        teacher_batch_size=cfg.batch_size,
    )
    cache = create_or_open(cfg.out, meta, force_new=cfg.force_new)
    first_bs = cache.meta.teacher_batch_size
    if first_bs is not None and first_bs != cfg.batch_size:
        log.warning(
            "this cache was started with --batch-size %s, now %s: resumed units are equal to fp rounding, "
            "not byte-identical, to what the first batch size would give",
            first_bs,
            cfg.batch_size,
        )
    return Phase1(cfg=cfg, cache=cache, teacher=teacher, shards=shards, recipe=recipe, device=device)


def _my_units(job: Phase1) -> list[tuple[int, int]]:
    """This job's share of the units of the requested view range that are not done yet."""
    cfg, meta = job.cfg, job.cache.meta
    first, stop = cfg.view_bounds()
    blocks = [b for b in range(meta.num_blocks) if first <= meta.block_views(b).start < stop]
    all_units = [(b, s) for b in blocks for s in range(len(job.shards))]
    index, count, source = job_slot(cfg.job_index, cfg.job_count)
    mine = my_share(all_units, index, count)
    done = job.cache.done_counts()
    todo = [(b, s) for b, s in mine if done[b, s] < 0]
    log.info(
        "job %d/%d (%s): %d of %d units are mine, %d already done",
        index,
        count,
        source,
        len(mine),
        len(all_units),
        len(mine) - len(todo),
    )
    job.summary.update(units_total=len(all_units), units_mine=len(mine), units_skipped=len(mine) - len(todo))
    return todo


def run(cfg: CacheConfig) -> dict[str, Any]:
    """Run (or resume) this worker's share of the cache. Returns the summary it prints."""
    t0 = time.perf_counter()
    job = prepare(finish(cfg))
    job.summary.update(units_done=0, images=0, views=0, skipped_samples={}, bytes_written=0)
    todo = _my_units(job)
    if todo:
        _process(job, todo)
    job.summary["wall_s"] = round(time.perf_counter() - t0, 3)
    return job.summary


def _loader(job: Phase1, todo: list[tuple[int, int]]) -> DataLoader:
    stream = UnitStream(todo, job.shards, job.cache.meta, job.recipe, job.cfg.batch_size, job.cfg.on_error)  # type: ignore[arg-type]
    workers = min(job.cfg.workers, len(todo))
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=job.device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )


def _process(job: Phase1, todo: list[tuple[int, int]]) -> None:
    """Run the teacher on every batch of ``todo`` and write each unit when its worker finishes it."""
    meta = job.cache.meta
    buffers: dict[tuple[int, int], UnitData] = {}
    total_views = sum(len(meta.block_views(b)) * job.shards[s].count for b, s in todo)
    with progress_bar("cache-teacher", total=total_views, unit="img·view", mode=job.cfg.progress) as bar:
        for item in _loader(job, todo):
            unit = (int(item["unit"][0]), int(item["unit"][1]))
            buf = buffers.setdefault(unit, UnitData.empty(meta, unit[0]))
            if item["end"]:
                _finish_unit(job, unit, buffers.pop(unit), item)
                continue
            _teacher_batch(job, buf, item, first_view=meta.block_views(unit[0]).start)
            job.summary["views"] += len(item["keys"])
            bar.advance(len(item["keys"]))
    if buffers:
        raise RuntimeError(f"units {sorted(buffers)} never finished: the data loader stopped early")


def _teacher_batch(job: Phase1, buf: UnitData, item: dict[str, Any], first_view: int) -> None:
    """Teacher forward on one batch; its top-k targets go into the unit's buffer by (view, position)."""
    pixels = item["pixels"].to(job.device, non_blocking=True)
    if job.device.type == "cuda":
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(job.device):
        logits = job.teacher(pixels)
    meta = job.cache.meta
    values, indices, lse = topk_targets(logits, meta.topk, list(meta.temperatures))
    vi = (item["view"] - first_view).numpy()
    pos = item["position"].numpy()
    buf.values[vi, pos] = values.cpu().numpy()
    buf.indices[vi, pos] = indices.cpu().numpy().astype(meta.index_dtype)
    buf.logsumexp[vi, pos] = lse.cpu().numpy()
    buf.labels[pos] = item["label"].numpy()
    buf.keys[pos] = item["keys"]


def _finish_unit(job: Phase1, unit: tuple[int, int], buf: UnitData, end: dict[str, Any]) -> None:
    summary = job.summary
    for reason, n in end["skipped"].items():
        summary["skipped_samples"][reason] = summary["skipped_samples"].get(reason, 0) + n
    job.cache.write_unit(unit[0], unit[1], buf, int(end["count"]))
    summary["units_done"] += 1
    summary["images"] += int(end["count"])
    summary["bytes_written"] += buf.nbytes
