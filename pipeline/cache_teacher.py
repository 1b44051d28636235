"""Phase 1: run the teacher over replayed views once and store top-k logits in the cache.

Work is split into units (view block x shard). DataLoader workers each take whole units: they
read the shard once, decode every image once, and replay every view of the block from it. The
main process runs the frozen teacher, keeps one buffer per unit in flight, and writes a unit's
chunks and then its completion marker when the worker reports the unit finished. Re-running skips
finished units; a unit cut short by a crash has no marker and is redone from scratch.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import cache as cache_mod
from .models import (
    autocast,
    file_sha256,
    index_dtype,
    load_teacher,
    resolve_device,
    topk_targets,
)
from .partition import job_slot, my_share
from .progress import progress_bar
from .recipe import Recipe, make_recipe
from .replay import replay_shard
from .shards import (
    DataError,
    OnError,
    ShardInfo,
    SkipStats,
    iter_decoded,
    load_shard_list,
    num_classes_from_sidecar,
)

log = logging.getLogger(__name__)


@dataclass
class CacheConfig:
    """Options of ``stillroom cache-teacher`` (YAML keys have the same names)."""

    shards: str = ""
    out: str = ""
    teacher: str = "regnety_160"
    teacher_checkpoint: str | None = None
    teacher_pretrained: bool = False
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None
    recipe: Any = "deit"
    img_size: int | None = None
    views: int = 10
    view_range: str | None = None
    view_block: int = 5
    topk: int = 10
    temperatures: list[float] = field(default_factory=lambda: [1.0, 3.0])
    capacity: int | None = None
    seed: int = 0
    batch_size: int = 128
    workers: int = 2
    device: str = "cpu"
    compile: bool = False
    job_index: int | None = None
    job_count: int | None = None
    on_error: str = "raise"
    force_new: bool = False
    progress: bool = True


def _view_range(cfg: CacheConfig) -> tuple[int, int]:
    if not cfg.view_range:
        return 0, cfg.views
    try:
        a, b = (int(x) for x in cfg.view_range.split(":"))
    except ValueError:
        raise ValueError(f"--view-range {cfg.view_range!r}: expected START:STOP") from None
    if not (0 <= a < b <= cfg.views) or a % cfg.view_block or (b % cfg.view_block and b != cfg.views):
        raise ValueError(f"--view-range {a}:{b} must lie in [0, {cfg.views}] on view-block ({cfg.view_block}) edges")
    return a, b


class UnitStream(IterableDataset):
    """Yields teacher-ready batches of replayed views, unit by unit, then an end-of-unit record.

    Runs inside DataLoader workers; each worker takes every n-th unit, so a unit is never split
    across workers and its image decodes happen once.
    """

    def __init__(
        self,
        units: list[tuple[int, int]],
        shards: list[ShardInfo],
        block_views: dict[int, range],
        recipe: Recipe,
        seed: int,
        num_classes: int,
        batch_size: int,
        on_error: OnError,
    ):
        self.units, self.shards, self.block_views = units, shards, block_views
        self.recipe, self.seed, self.num_classes = recipe, seed, num_classes
        self.batch_size, self.on_error = batch_size, on_error

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        units = my_share(self.units, info.id, info.num_workers) if info else self.units
        for block, s in units:
            yield from self._unit(block, s)

    def _unit(self, block: int, s: int) -> Iterator[dict[str, Any]]:
        shard = self.shards[s]
        views = self.block_views[block]
        stats = SkipStats()
        samples = iter_decoded(shard, s, self.num_classes, self.on_error, stats)
        pending: list = []
        positions: set[int] = set()
        for window in replay_shard(samples, views, self.recipe, self.seed, shard.name):
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
class UnitBuffer:
    """Accumulates one unit's teacher outputs until the worker says the unit is complete."""

    values: np.ndarray
    indices: np.ndarray
    lse: np.ndarray
    labels: np.ndarray
    keys: np.ndarray
    first_view: int

    @classmethod
    def empty(cls, n_views: int, capacity: int, k: int, t: int, idx_dtype: str, first_view: int) -> UnitBuffer:
        return cls(
            values=np.zeros((n_views, capacity, k), np.float16),
            indices=np.full((n_views, capacity, k), -1, idx_dtype),
            lse=np.zeros((n_views, capacity, t), np.float32),
            labels=np.full((capacity,), -1, np.int32),
            keys=np.full((capacity,), "", dtype=object),
            first_view=first_view,
        )


def build_teacher(cfg: CacheConfig, num_classes: int, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """Frozen teacher in eval mode wrapped with its normalisation, and its identity for the cache."""
    if not cfg.teacher_checkpoint and not cfg.teacher_pretrained:
        raise ValueError("cache-teacher needs --teacher-checkpoint FILE (or --teacher-pretrained with a model hub)")
    model, built = load_teacher(
        cfg.teacher, num_classes, cfg.teacher_checkpoint, device, cfg.teacher_kwargs, cfg.teacher_pretrained
    )
    if device.type == "cuda" and cfg.compile:
        model = torch.compile(model)
    ident = {
        "name": cfg.teacher,
        "checkpoint_sha256": file_sha256(cfg.teacher_checkpoint) if cfg.teacher_checkpoint else "pretrained",
        **built,
    }
    return model, ident


def check_shards_exist(shards: list[ShardInfo]) -> None:
    """Refuse a missing local shard before any work (counts may come from a sidecar that still lists it)."""
    missing = [
        s.url
        for s in shards
        if ("://" not in s.url or s.url.startswith("file://"))
        and not s.url.startswith("pipe:")
        and not os.path.exists(s.url.removeprefix("file://"))
    ]
    if missing:
        more = f" ({len(missing) - 1} more missing, e.g. {missing[1]!r})" if len(missing) > 1 else ""
        raise DataError(f"shard {missing[0]!r} does not exist{more}")


def check_options(cfg: CacheConfig) -> None:
    """Refuse settings that would crash later or store a useless cache (inf logsumexp, no views)."""
    for name in ("views", "view_block", "topk", "batch_size"):
        if int(getattr(cfg, name)) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if not cfg.temperatures or any(not float(t) > 0 for t in cfg.temperatures):
        raise ValueError(f"--temperatures must be one or more positive numbers, got {cfg.temperatures}")
    if cfg.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {cfg.workers}")


def prepare(cfg: CacheConfig) -> tuple[cache_mod.Cache, torch.nn.Module, list[ShardInfo], Recipe, torch.device]:
    """Resolve shards, teacher and recipe; create or reopen the cache (refusing a mismatch)."""
    check_options(cfg)
    shards = load_shard_list(cfg.shards)
    check_shards_exist(shards)
    num_classes = cfg.num_classes or num_classes_from_sidecar(shards[0].url)
    if not num_classes:
        raise ValueError("number of classes unknown: pass --num-classes (no pack sidecar next to the shards)")
    if cfg.topk > num_classes:
        raise ValueError(f"--topk {cfg.topk} is larger than the number of classes ({num_classes})")
    largest = max(s.count for s in shards)
    capacity = cfg.capacity or largest
    if capacity < largest:
        big = next(s for s in shards if s.count == largest)
        raise ValueError(f"--capacity {capacity} is smaller than shard {big.url!r} ({largest} samples)")
    recipe = make_recipe(cfg.recipe, cfg.img_size)
    device = resolve_device(cfg.device)
    teacher, ident = build_teacher(cfg, num_classes, device)
    ident["input_size"] = recipe.img_size
    meta = cache_mod.build_meta(
        shards=shards,
        capacity=capacity,
        num_classes=num_classes,
        topk=cfg.topk,
        temperatures=cfg.temperatures,
        views=cfg.views,
        view_block=cfg.view_block,
        seed=cfg.seed,
        recipe=recipe.to_dict(),
        teacher=ident,
    )
    # Not part of the fingerprint, but CPU kernels may round differently at another batch size, so
    # a unit redone with another batch size can differ from its first writing in the last bits.
    meta["teacher_batch_size"] = cfg.batch_size
    cache = cache_mod.create_or_open(cfg.out, meta, force_new=cfg.force_new)
    first_bs = cache.meta.get("teacher_batch_size")
    if first_bs is not None and first_bs != cfg.batch_size:
        log.warning(
            "this cache was started with --batch-size %s, now %s: resumed units are equal to fp rounding, "
            "not byte-identical, to what the first batch size would give",
            first_bs,
            cfg.batch_size,
        )
    return cache, teacher, shards, recipe, device


def run(cfg: CacheConfig) -> dict[str, Any]:
    """Run (or resume) this worker's share of the cache. Returns the summary it prints."""
    t0 = time.perf_counter()
    cache, teacher, shards, recipe, device = prepare(cfg)
    first, stop = _view_range(cfg)
    blocks = [b for b in range(cache.num_blocks) if first <= cache.block_views(b).start < stop]
    all_units = [(b, s) for b in blocks for s in range(len(shards))]
    index, count, source = job_slot(cfg.job_index, cfg.job_count)
    mine = my_share(all_units, index, count)
    done = cache.done_counts()
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
    summary = {
        "units_total": len(all_units),
        "units_mine": len(mine),
        "units_skipped": len(mine) - len(todo),
        "units_done": 0,
        "images": 0,
        "views": 0,
        "skipped_samples": {},
        "bytes_written": 0,
    }
    if todo:
        _process(cfg, cache, teacher, shards, recipe, device, todo, summary)
    summary["wall_s"] = round(time.perf_counter() - t0, 3)
    return summary


def _process(
    cfg: CacheConfig,
    cache: cache_mod.Cache,
    teacher: torch.nn.Module,
    shards: list[ShardInfo],
    recipe: Recipe,
    device: torch.device,
    todo: list[tuple[int, int]],
    summary: dict,
) -> None:
    meta = cache.meta
    k, temps = int(meta["topk"]), list(meta["temperatures"])
    idx_dtype = index_dtype(int(meta["num_classes"]))
    block_views = {b: cache.block_views(b) for b, _ in todo}
    stream = UnitStream(
        todo, shards, block_views, recipe, cfg.seed, int(meta["num_classes"]), cfg.batch_size, cfg.on_error
    )  # type: ignore[arg-type]
    workers = min(cfg.workers, len(todo))
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )
    buffers: dict[tuple[int, int], UnitBuffer] = {}
    total_views = sum(len(block_views[b]) * shards[s].count for b, s in todo)
    with progress_bar("cache-teacher", total=total_views, unit="img·view", enabled=cfg.progress) as bar:
        for item in loader:
            unit = tuple(int(x) for x in item["unit"])
            b, _s = unit
            if unit not in buffers:
                views = block_views[b]
                buffers[unit] = UnitBuffer.empty(len(views), cache.capacity, k, len(temps), idx_dtype, views.start)
            buf = buffers[unit]
            if item["end"]:
                _finish_unit(cache, unit, buf, item, summary)
                del buffers[unit]
                continue
            pixels = item["pixels"].to(device, non_blocking=True)
            if device.type == "cuda":
                pixels = pixels.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), autocast(device):
                logits = teacher(pixels)
            values, indices, lse = topk_targets(logits, k, temps)
            vi = (item["view"] - buf.first_view).numpy()
            pos = item["position"].numpy()
            buf.values[vi, pos] = values.cpu().numpy()
            buf.indices[vi, pos] = indices.cpu().numpy().astype(idx_dtype)
            buf.lse[vi, pos] = lse.cpu().numpy()
            buf.labels[pos] = item["label"].numpy()
            buf.keys[pos] = item["keys"]
            summary["views"] += len(pos)
            bar.advance(len(pos))
    if buffers:
        raise RuntimeError(f"units {sorted(buffers)} never finished: the data loader stopped early")


def _finish_unit(cache: cache_mod.Cache, unit: tuple[int, int], buf: UnitBuffer, end: dict, summary: dict) -> None:
    b, s = unit
    for reason, n in end["skipped"].items():
        summary["skipped_samples"][reason] = summary["skipped_samples"].get(reason, 0) + n
    keys = np.asarray(buf.keys.astype(str))
    cache.write_unit(b, s, buf.values, buf.indices, buf.lse, buf.labels, keys, int(end["count"]))
    summary["units_done"] += 1
    summary["images"] += int(end["count"])
    summary["bytes_written"] += buf.values.nbytes + buf.indices.nbytes + buf.lse.nbytes


def config_dict(cfg: CacheConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
