"""The profiles of ``bench/loader_speed.py``: ours op by op, timm's stage by stage, and a chunk's IPC cost.

Ours is profiled through a replica of :func:`pipeline.views.augment.augment` and of phase 2's pair replay that
times each step; every replayed view is compared with what :func:`pipeline.views.replay.pair_copies` gives for
it, and a difference stops the benchmark (the profile must explain the code that runs, not a copy of it).
"""

from __future__ import annotations

import io
import random
import resource
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate

from pipeline.phase2.lanes import collate
from pipeline.shards.decode import DecodedSample, decode_image
from pipeline.views.augment import (
    Augmented,
    _color_jitter,
    _erase_box,
    _rand_augment_setup,
    apply_op,
    rand_augment_ops,
    random_resized_crop,
    to_tensor,
    view_generators,
)
from pipeline.views.mixing import mix_pair, partners
from pipeline.views.pixels import checked_row, compact, pixel_digest, stack_views
from pipeline.views.recipe import Recipe
from pipeline.views.replay import pair_copies

CACHE_VIEWS = 300  # the checked rows of a DeiT cache (300 views): 1 row in 16 per view


class Clock:
    """Seconds and calls per step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def __call__(self, step: str, fn: Callable, *args: Any) -> Any:
        t0 = time.process_time()  # CPU time: a step is not charged for the time other processes take
        out = fn(*args)
        self.seconds[step] += time.process_time() - t0
        self.calls[step] += 1
        return out

    def table(self, views: int, extra: dict[str, tuple[int, float]] | None = None) -> list[dict[str, Any]]:
        """Rows per step: calls and ms per view, ms per call, share of the total; ``extra`` rows are shown
        with their ms per call but count zero calls (measured aside, not part of the recipe)."""
        total = sum(self.seconds.values())
        rows = [
            {
                "step": step,
                "calls_per_view": self.calls[step] / views,
                "ms_per_call": 1e3 * s / self.calls[step],
                "ms_per_view": 1e3 * s / views,
                "share": s / total,
            }
            for step, s in sorted(self.seconds.items(), key=lambda kv: -kv[1])
        ]
        for step, (calls, s) in (extra or {}).items():
            rows.append(
                {"step": step, "calls_per_view": 0.0, "ms_per_call": 1e3 * s / calls, "ms_per_view": 0.0, "share": 0.0}
            )
        rows.append(
            {
                "step": "total",
                "calls_per_view": 1.0,
                "ms_per_call": 1e3 * total / views,
                "ms_per_view": 1e3 * total / views,
                "share": 1.0,
            }
        )
        return rows


def replica_augment(t: Clock, img: Image.Image, recipe: Recipe, seed: int, view: int, key: str) -> Augmented:
    """:func:`pipeline.views.augment.augment` (random recipes), step by step on the clock."""
    rng, gen = t("view generators (seeding)", view_generators, seed, view, key)
    img = t("resized crop (box, crop, resize)", random_resized_crop, img, recipe, rng)
    if rng.random() < recipe.hflip:
        img = t("flip", img.transpose, Image.Transpose.FLIP_LEFT_RIGHT)
    if recipe.auto_augment:
        spec, names = _rand_augment_setup(recipe.auto_augment)
        for name, args in t("RandAugment draws", rand_augment_ops, spec, names, rng):
            img = t(f"RandAugment {name}", apply_op, img, name, args, recipe)
    elif recipe.color_jitter > 0:
        img = t("colour jitter", _color_jitter, img, recipe.color_jitter, rng)
    x = t("to tensor", to_tensor, img)
    box = t("erasing box draw", _erase_box, tuple(x.shape), recipe, rng) if recipe.reprob > 0 else None
    return Augmented(x, box, gen if box else None)


def _replica_pair(
    t: Clock, a: DecodedSample, b: DecodedSample | None, view: int, recipe: Recipe, seed: int, shard: str
) -> list[tuple[torch.Tensor, int, float]]:
    """``(pixels, mix label, lambda)`` of ``a`` and its partner as replay makes them
    (:func:`pipeline.views.replay._pair_views`)."""
    xa = t("erasing", replica_augment(t, a.image, recipe, seed, view, a.key).erased, recipe)
    if b is None:
        return [(t("compaction", compact, xa), a.label, 1.0)]
    xb = t("erasing", replica_augment(t, b.image, recipe, seed, view, b.key).erased, recipe)
    mixed = t("mixing", mix_pair, xa, xb, recipe, seed, view, shard, (a.position, b.position))
    if mixed is None:
        return [(t("compaction", compact, xa), a.label, 1.0), (t("compaction", compact, xb), b.label, 1.0)]
    ma, mb, lam = mixed
    return [(t("compaction", compact, ma), b.label, lam), (t("compaction", compact, mb), a.label, lam)]


def _same(got: list[tuple[torch.Tensor, int, float]], views: list) -> None:
    for (pixels, mix_label, lam), v in zip(got, views, strict=True):
        if (
            pixels.dtype != v.pixels.dtype
            or not torch.equal(pixels, v.pixels)
            or (mix_label, lam) != (v.mix_label, v.lam)
        ):
            raise SystemExit(f"profile replica differs from pair_copies on {v.key} view {v.view_id}: fix the replica")


def profile_ours(photos: list[tuple[str, bytes]], recipe: Recipe, seed: int, shard: str, chunk: int) -> list[dict]:
    """Time per view of each step of phase 2's replay (R copies per decode), checked against the real one."""
    t = Clock()
    samples = [DecodedSample(k, 0, i, t("decode", decode_image, d), i % 1000) for i, (k, d) in enumerate(photos)]
    views = list(range(recipe.repeats))
    made: list[torch.Tensor] = []
    for a, b in partners(seed, 0, shard, len(samples), recipe.repeats, range(len(samples))):
        sa, sb = samples[a], None if b is None else samples[b]
        real_a, real_b = pair_copies(sa, sb, views, recipe, seed, shard)
        for i, v in enumerate(views):
            got = _replica_pair(t, sa, sb, v, recipe, seed, shard)
            _same(got, [real_a[i]] + ([real_b[i]] if sb is not None else []))
            made += [g[0] for g in got]
            checked = [checked_row(seed, CACHE_VIEWS, v, shard, s.position) for s in (sa, sb) if s is not None]
            for pixels, check in zip([g[0] for g in got], checked, strict=True):
                if check:
                    t("pixel digests (1 row in 16)", pixel_digest, pixels)
    for i in range(0, len(made), chunk):
        t(f"batching (stack_views of {chunk})", stack_views, made[i : i + chunk])
    jitter = Clock()
    rng = random.Random(seed)
    for s in samples:
        jitter("j", _color_jitter, random_resized_crop(s.image, recipe, rng), 0.3, rng)
    return t.table(
        len(made), {"colour jitter (off: RandAugment replaces it)": (jitter.calls["j"], jitter.seconds["j"])}
    )


def profile_timm(photos: list[tuple[str, bytes]], transform: Any, chunk: int = 32) -> list[dict]:
    """timm's pipeline stage by stage (decode, each transform of the Compose, DataLoader's collation)."""
    random.seed(0)
    torch.manual_seed(0)
    t = Clock()
    out = []
    for _, data in photos:
        x = t("decode", lambda d: Image.open(io.BytesIO(d)).convert("RGB"), data)
        for stage in transform.transforms:
            x = t(type(stage).__name__, stage, x)
        out.append(x)
    for i in range(0, len(out), chunk):
        t(f"batching (torch.stack of {chunk}, float32)", torch.stack, out[i : i + chunk])
    return t.table(len(photos))


class _Chunks(IterableDataset):
    """``count`` chunks, each made afresh by ``make`` where it is consumed (a worker, or this process)."""

    def __init__(self, make: Callable[[], dict[str, Any]], count: int):
        self.make, self.count = make, count

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for _ in range(self.count):
            yield self.make()


def _cpu() -> tuple[float, float]:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


def _send(make: Callable[[], dict[str, Any]], count: int, workers: int) -> tuple[float, float]:
    """CPU seconds (this process, its reaped workers) to make and receive ``count`` chunks."""
    own0, kids0 = _cpu()
    for _ in DataLoader(_Chunks(make, count), batch_size=None, num_workers=workers):
        pass
    own1, kids1 = _cpu()
    return own1 - own0, kids1 - kids0


def _per_chunk(make: Callable[[], dict[str, Any]], count: int, workers: int) -> tuple[float, float]:
    """CPU seconds per chunk (both processes, this one): runs of ``count`` and ``2 count`` chunks subtracted,
    so a worker's start and stop cancel out."""
    own1, kids1 = _send(make, count, workers)
    own2, kids2 = _send(make, 2 * count, workers)
    return ((own2 + kids2) - (own1 + kids1)) / count, (own2 - own1) / count


def _phase2_copies(photos: list[tuple[str, bytes]], recipe: Recipe, seed: int, shard: str, n: int) -> list:
    samples = [DecodedSample(k, 0, i, decode_image(d), i % 1000) for i, (k, d) in enumerate(photos[: n + 1])]
    copies = []
    for a, b in partners(seed, 0, shard, len(samples), 1, range(len(samples))):
        ca, cb = pair_copies(samples[a], None if b is None else samples[b], [0], recipe, seed, shard)
        copies += ca + cb
    return (copies * n)[:n]


def ipc_cost(
    photos: list[tuple[str, bytes]], recipe: Recipe, seed: int, shard: str, chunk: int, count: int
) -> list[dict]:
    """A chunk made where phase 2 makes it (``data.collate`` of ``chunk`` replayed copies) and timm's batch of as
    many views (DataLoader's ``default_collate``), through one DataLoader worker and in-process: the
    difference is what moving the chunk between processes costs (pickling, shared memory, unpickling)."""
    copies = _phase2_copies(photos, recipe, seed, shard, chunk)
    items = [(i, v, None) for i, v in enumerate(copies)]
    random.seed(0)
    torch.manual_seed(0)
    size = recipe.img_size
    timm_views = [(torch.randn(3, size, size), 0) for _ in range(chunk)]
    makers = {
        "ours (data.collate)": lambda: collate(items, 0),
        "timm (default_collate)": lambda: default_collate(timm_views),
    }
    rows = []
    for what, make in makers.items():
        pixels = make()["pixels" if "ours" in what else 0]
        local, _ = _per_chunk(make, count, 0)
        both, main = _per_chunk(make, count, 1)
        rows.append(
            {
                "what": f"{what}, {str(pixels.dtype).removeprefix('torch.')}",
                "mb": pixels.numel() * pixels.element_size() / 1e6,
                "ms_make_per_view": 1e3 * local / chunk,
                "ms_cpu_per_view": 1e3 * (both - local) / chunk,
                "ms_main_per_view": 1e3 * main / chunk,
            }
        )
    return rows
