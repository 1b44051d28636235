"""Phase 1: run the teacher over replayed views once and store top-k logits in the cache.

Work is split into units (view block x shard). DataLoader workers each take whole units: they
read the shard once, decode every image once, and replay every view of the block from it. The
main process runs the frozen teacher, keeps one buffer per unit in flight, and hands a unit to a
writer thread when the worker reports it finished; the writer stores the unit's chunks and then its
completion marker (count and checksum), so the teacher never waits on storage. Re-running skips
finished units whose objects are intact (and whose checksums match, with ``--verify-done``); a unit
cut short by a crash has no marker, and a damaged one loses its marker: both are redone from scratch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline import storage
from pipeline.cache import Cache, CacheMeta, UnitData, create_or_open, damaged_units, diff_fields, open_cache
from pipeline.config import checked
from pipeline.errors import ConfigError
from pipeline.interrupt import RunInterrupted, StopSignals
from pipeline.models.build import autocast, resolve_device
from pipeline.models.targets import pack_rows, reduction_of, teacher_outputs, unpack_rows
from pipeline.models.teacher import checkpoint_num_classes, load_teacher, teacher_weights
from pipeline.options import CacheConfig
from pipeline.partition import job_slot, my_share
from pipeline.phase1.unit_stream import UnitStream, unit_batches
from pipeline.phase1.unit_writer import UnitWriter
from pipeline.progress import progress_bar
from pipeline.shards.lists import ShardInfo, class_names, load_shard_list, num_classes_from_sidecar
from pipeline.shards.samples import SkipStats
from pipeline.views.recipe import Recipe, make_recipe

log = logging.getLogger(__name__)


@dataclass
class CacheJob:
    """A resolved phase-1 job: the cache it fills, its teacher and the data it reads."""

    cfg: CacheConfig
    cache: Cache
    teacher: torch.nn.Module
    shards: list[ShardInfo]
    recipe: Recipe
    device: torch.device
    summary: dict[str, Any] = field(default_factory=dict)
    # Bad samples per shard and reason: every view block re-reads its shard and meets the same ones.
    skipped: dict[int, Counter] = field(default_factory=dict)
    checked_shards: set[int] = field(default_factory=set)  # shards whose older units were compared with now


def build_teacher(cfg: CacheConfig, num_classes: int, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """Frozen teacher in eval mode wrapped with its normalisation, and its identity for the cache.

    The identity holds the SHA-256 of the file the weights were read from: the checkpoint, or the file
    timm's pretrained weights were found in (:mod:`pipeline.models.teacher`), so that phase 2 and
    ``verify-cache`` can prove they run the very same teacher.
    """
    if not cfg.teacher_checkpoint and not cfg.teacher_pretrained:
        raise ConfigError("cache-teacher needs --teacher-checkpoint FILE or --teacher-pretrained (timm's weights)")
    weights = teacher_weights(cfg.teacher, cfg.teacher_checkpoint, cfg.teacher_pretrained, cfg.teacher_kwargs)
    model, built = load_teacher(cfg.teacher, num_classes, weights, device, cfg.teacher_kwargs)
    if weights.pretrained:
        log.info("teacher %s: %s, from %s, sha256 %s", cfg.teacher, weights.pretrained, weights.where, weights.sha256)
    if device.type == "cuda" and cfg.compile:
        model = torch.compile(model)
    return model, {"name": cfg.teacher, **built}


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


def like(cfg: CacheConfig) -> tuple[CacheConfig, CacheMeta | None]:
    """``--like CACHE``: this cache's views are that cache's (shards unless given, recipe, seed, views, view
    blocks, capacity, classes); only the teacher and its reduction are this run's."""
    if not cfg.like:
        return cfg, None
    meta = open_cache(cfg.like).meta
    views = {"views": meta.views, "view_block": meta.view_block, "seed": meta.seed, "capacity": meta.capacity}
    shards = cfg.shards or [s.url for s in meta.shards]
    taken = {"recipe": meta.recipe, "img_size": None, "repeats": None, "num_classes": meta.num_classes, **views}
    return dataclasses.replace(cfg, shards=shards, **taken), meta


def _same_views(meta: CacheMeta, other: CacheMeta | None) -> None:
    if other is not None and meta.views_fingerprint != other.views_fingerprint:
        diffs = diff_fields(other.views_identity(), meta.views_identity())
        raise ConfigError(f"--like: these views are not those of the cache given: {'; '.join(diffs)}")


def prepare(cfg: CacheConfig) -> CacheJob:
    """Resolve shards, teacher and recipe; create or reopen the cache (refusing a mismatch)."""
    job_slot(cfg.job_index, cfg.job_count)  # a bad --job-index is refused before anything is created
    cfg, other = like(cfg)
    shards = load_shard_list(cfg.shards, label_key=cfg.label_key)
    # An unreachable cache store must fail here, in one line, not in cache creation's wait for other jobs.
    storage.exists(cfg.out)
    num_classes = _num_classes(cfg, shards)
    recipe = make_recipe(cfg.recipe, cfg.img_size, cfg.repeats)
    if cfg.views % recipe.repeats:
        raise ConfigError(f"--views {cfg.views} must be a multiple of --repeats {recipe.repeats}")
    device = resolve_device(cfg.device)
    teacher, ident = build_teacher(cfg, num_classes, device)
    ident["input_size"] = recipe.img_size
    meta = CacheMeta.build(
        shards=shards,
        num_classes=num_classes,
        capacity=_capacity(cfg, shards),
        topk=cfg.topk,
        topk_mass=cfg.topk_mass,
        topk_min=cfg.topk_min if cfg.topk_mass is not None else 1,
        temperatures=tuple(float(t) for t in cfg.temperatures),
        views=cfg.views,
        view_block=cfg.view_block,
        seed=cfg.seed,
        recipe=recipe.to_dict(),
        teacher=ident,
        # Not part of the fingerprint, but CPU kernels may round differently at another batch size, so
        # a unit redone with another batch size can differ from its first writing in the last bits.
        teacher_batch_size=cfg.batch_size,
        classes=tuple(names) if (names := class_names(cfg.shards)) else None,
    )
    _same_views(meta, other)
    cache = create_or_open(cfg.out, meta, force_new=cfg.force_new)
    first_bs = cache.meta.teacher_batch_size
    if first_bs is not None and first_bs != cfg.batch_size:
        log.warning(
            "this cache was started with --batch-size %s, now %s: resumed units are equal to fp rounding, "
            "not byte-identical, to what the first batch size would give",
            first_bs,
            cfg.batch_size,
        )
    return CacheJob(cfg=cfg, cache=cache, teacher=teacher, shards=shards, recipe=recipe, device=device)


def _my_units(job: CacheJob) -> list[tuple[int, int]]:
    """This job's share of the units of the requested view range that are not done yet, or damaged."""
    cfg, meta = job.cfg, job.cache.meta
    first, stop = cfg.view_bounds()
    blocks = [b for b in range(meta.num_blocks) if first <= meta.block_views(b).start < stop]
    all_units = [(b, s) for b in blocks for s in range(len(job.shards))]
    index, count, source = job_slot(cfg.job_index, cfg.job_count)
    mine = my_share(all_units, index, count)
    done = job.cache.done_mask()
    finished = [(b, s) for b, s in mine if done[b, s]]
    damaged = _damaged(job, finished)
    todo = [(b, s) for b, s in mine if not done[b, s] or (b, s) in damaged]
    log.info(
        "job %d/%d (%s): %d of %d units are mine, %d already done, %d of them damaged",
        index,
        count,
        source,
        len(mine),
        len(all_units),
        len(finished),
        len(damaged),
    )
    job.summary.update(
        units_total=len(all_units),
        units_mine=len(mine),
        units_skipped=len(finished) - len(damaged),
        units_damaged=len(damaged),
    )
    return todo


def _damaged(job: CacheJob, finished: list[tuple[int, int]]) -> set[tuple[int, int]]:
    """Finished units of this job that are damaged (always a listing; a read-back with ``verify_done``).

    Each one's marker is removed first, so a job killed while redoing it leaves it not done.
    """
    t0 = time.perf_counter()
    verify = job.cfg.verify_done or job.cache.restored  # restored metadata proves nothing about the units
    damaged = damaged_units(job.cache, finished, verify=verify)
    log.info(
        "checked %d finished units in %.1fs (%s)",
        len(finished),
        time.perf_counter() - t0,
        "checksums" if verify else "objects present",
    )
    for (b, s), why in sorted(damaged.items()):
        log.warning("cache %s: %s is damaged (%s); redoing it", job.cfg.out, job.cache.meta.describe_unit(b, s), why)
        job.cache.invalidate(b, s)
    return set(damaged)


class _OncePerMessage(logging.Filter):
    """Lets each bad-sample warning through once per process: every view block re-reads the shard."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if text in self.seen:
            return False
        self.seen.add(text)
        return True


def run(cfg: CacheConfig) -> dict[str, Any]:
    """Run (or resume) this worker's share of the cache. Returns the summary it prints.

    Raises:
        RunInterrupted: on SIGINT/SIGTERM, once every unit finished before it is written.
        WorkerError: a loader worker died (or was sent SIGTERM alone), once the finished units are written.
    """
    t0 = time.perf_counter()
    with StopSignals() as stop:
        job = prepare(checked(cfg))
        job.summary.update(units_done=0, images=0, views=0, skipped_samples={}, bytes_written=0, write_wait_s=0.0)
        todo = _my_units(job) if stop.received is None else []  # a stop before the damage check skips it
        if todo:
            once = _OncePerMessage()
            shards_log = logging.getLogger(SkipStats.__module__)  # where bad samples are logged
            shards_log.addFilter(once)  # before the loader's workers fork, so they inherit it
            try:
                _process(job, todo, stop)
            finally:
                shards_log.removeFilter(once)
        if stop.received is not None and job.summary["units_done"] < len(todo or [None]):  # else it finished
            raise RunInterrupted(
                stop.received,
                f"stopped by signal {stop.received}: {job.summary['units_done']} more unit(s) of cache {cfg.out!r} "
                "finished and written; run the same command again to continue",
            )
    job.summary["wall_s"] = round(time.perf_counter() - t0, 3)
    return job.summary


def _stream(job: CacheJob, todo: list[tuple[int, int]]) -> UnitStream:
    meta, cfg = job.cache.meta, job.cfg
    return UnitStream(todo, job.shards, meta, job.recipe, cfg.batch_size, cfg.on_error)  # type: ignore[arg-type]


def _process(job: CacheJob, todo: list[tuple[int, int]], stop: StopSignals) -> None:
    """Run the teacher on every batch of ``todo`` and hand each unit to the writer when its worker finishes it.

    One batch is in flight on the device while the previous batch's targets are copied back and
    stored, and finished units are written by a background thread: the teacher waits neither on
    device-to-host copies nor on storage. A stop signal ends the loop at the next batch; the units
    finished by then are written, the others are redone by the next run.
    """
    meta = job.cache.meta
    buffers: dict[tuple[int, int], UnitData] = {}
    total_views = sum(len(meta.block_views(b)) * job.shards[s].count for b, s in todo)
    bar_ctx = progress_bar("cache-teacher", total=total_views, unit="img·view", mode=job.cfg.progress)
    with (
        bar_ctx as bar,
        UnitWriter(job.cache, job.summary) as writer,
        contextlib.closing(unit_batches(_stream(job, todo), job.cfg.workers, job.device, stop)) as items,
    ):
        pending: _Targets | None = None
        for item in items:
            unit = (int(item["unit"][0]), int(item["unit"][1]))
            if item["end"]:
                _store_targets(job, pending, buffers)
                pending = None
                _queue_unit(job, unit, buffers.pop(unit, None) or UnitData.empty(meta, unit[0]), item, writer)
                continue
            buffers.setdefault(unit, UnitData.empty(meta, unit[0]))
            launched = _teacher_batch(job, unit, item)
            _store_targets(job, pending, buffers)  # the previous batch, while the device runs this one
            pending = launched
            job.summary["views"] += len(item["keys"])
            bar.advance(len(item["keys"]))
        _store_targets(job, pending, buffers)
    if buffers and stop.received is None:
        raise RuntimeError(f"units {sorted(buffers)} never finished: the data loader stopped early")


@dataclass
class _Targets:
    """One batch's teacher targets on their way to the host (an asynchronous copy on CUDA)."""

    unit: tuple[int, int]
    item: dict[str, Any]
    host: torch.Tensor  # [n, bytes] uint8: every output of targets.teacher_outputs, side by side
    layout: list[tuple[str, torch.dtype, int]]
    ready: torch.cuda.Event | None


def _teacher_batch(job: CacheJob, unit: tuple[int, int], item: dict[str, Any]) -> _Targets:
    """Launch the teacher on one batch and one device-to-host copy of all its targets; do not wait for it."""
    pixels = item["pixels"].to(job.device, non_blocking=True)
    if job.device.type == "cuda":
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(job.device):
        logits = job.teacher(pixels)
    packed, layout = pack_rows(teacher_outputs(logits, reduction_of(job.cache.meta)))
    if job.device.type != "cuda":
        return _Targets(unit, item, packed, layout, None)
    host = torch.empty(packed.shape, dtype=torch.uint8, pin_memory=True)
    host.copy_(packed, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return _Targets(unit, item, host, layout, ready)


def _store_targets(job: CacheJob, t: _Targets | None, buffers: dict[tuple[int, int], UnitData]) -> None:
    """Wait for one batch's copy and put its targets into its unit's buffer by (view, position)."""
    if t is None:
        return
    if t.ready is not None:
        t.ready.synchronize()
    buf, item = buffers[t.unit], t.item
    vi = (item["view"] - job.cache.meta.block_views(t.unit[0]).start).numpy()
    pos = item["position"].numpy()
    outputs = unpack_rows(t.host.numpy(), t.layout)
    if not np.isfinite(outputs["logsumexp"]).all():
        bad = item["keys"][int(np.flatnonzero(~np.isfinite(outputs["logsumexp"]).all(axis=1))[0])]
        what = job.cache.meta.describe_unit(*t.unit)
        raise ConfigError(f"the teacher's output is not finite (NaN or inf) on {what}, key {bad!r}: check its weights")
    for name, rows in outputs.items():
        target = getattr(buf, name)
        target[vi, pos] = rows.astype(target.dtype, copy=False)
    buf.pixel_digests[vi, pos, 0] = item["pixel_digest"].numpy().astype(np.uint32)
    buf.labels[pos] = item["label"].numpy()
    buf.digests[pos] = item["digest"].numpy().astype(np.uint64)
    buf.keys[pos] = item["keys"]


def _queue_unit(job: CacheJob, unit: tuple[int, int], buf: UnitData, end: dict[str, Any], writer: UnitWriter) -> None:
    """Count the unit's bad samples once per shard, and queue the unit for writing."""
    block, s = unit
    _count_skipped(job, s, end["skipped"])
    _check_shard_unchanged(job, s, buf)
    writer.submit(block, s, buf, int(end["count"]))
    job.summary["units_done"] += 1
    job.summary["images"] += int(end["count"])
    job.summary["bytes_written"] += buf.nbytes


def _check_shard_unchanged(job: CacheJob, s: int, buf: UnitData) -> None:
    """Once per shard: if finished units of it were written from other samples (the shard was rebuilt
    under the same name and count since), they are not this cache's data any more: remove their markers so
    the next run redoes them, and say so. (Their per-shard arrays are about to be overwritten by this unit.)"""
    if s in job.checked_shards:
        return
    job.checked_shards.add(s)
    done = job.cache.done_mask()[:, s]
    if not done.any():
        return
    keys, digests = job.cache.keys(s), job.cache.digests(s)
    differ = np.flatnonzero((keys != buf.keys) | (digests != buf.digests))
    if not len(differ):
        return
    stale = [int(b) for b in np.flatnonzero(done)]
    for b in stale:
        job.cache.invalidate(b, s)
    job.summary["units_invalidated"] = job.summary.get("units_invalidated", 0) + len(stale)
    name, row = job.shards[s].name, int(differ[0])
    log.warning(
        "shard %r changed since %d finished unit(s) of it were written (%d rows differ, e.g. position %d: key %r, "
        "was %r): those units are not this cache's data any more and were marked not done; run cache-teacher "
        "again to redo them",
        name,
        len(stale),
        len(differ),
        row,
        str(buf.keys[row]),
        str(keys[row]),
    )


def _count_skipped(job: CacheJob, shard: int, reasons: dict[str, int]) -> None:
    """Every view block re-reads its shard and meets the same bad samples: count a shard's once.

    A shard's count is the largest any of its units reported (they all report the same samples).
    """
    before = job.skipped.get(shard, Counter())
    if sum(reasons.values()) <= sum(before.values()):
        return
    total = Counter(job.summary["skipped_samples"])
    total.subtract(before)
    total.update(reasons)
    job.summary["skipped_samples"] = {reason: n for reason, n in total.items() if n > 0}
    job.skipped[shard] = Counter(reasons)
    name = job.shards[shard].name
    log.warning("shard %r: %d bad sample(s) skipped: %s", name, sum(reasons.values()), "; ".join(sorted(reasons)))
