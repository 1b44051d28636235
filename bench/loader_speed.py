"""Loader speed per core: timm's DeiT training transform against stillroom's view replay, on the same photos.

One process, one torch thread, the photos of ``--images DIR`` read into memory once, then in interleaved
rounds (the order alternates, so a burst of load from other processes hits every measurement alike):

* ``timm``: what a DeiT loader worker does per image: decode (``Image.open(...).convert('RGB')``, as
  timm's ``ImageDataset``) and timm's ``create_transform(224, is_training=True, color_jitter=0.3,
  auto_augment='rand-m9-mstd0.5-inc1', interpolation='bicubic', re_prob=0.25, re_mode='pixel',
  re_count=1)`` (DeiT's ``build_transform``); one image is one view. Batch mixing runs on the GPU in DeiT,
  so it is not part of timm's loader.
* ``phase 2``: :func:`pipeline.views.replay.pair_copies` as phase 2's workers call it: each sample decoded once
  for its ``R`` copies (``--repeats``, DeiT's 3), every pair of :func:`pipeline.views.mixing.partners` mixed,
  random erasing, compact pixels.
* ``phase 1``: :func:`pipeline.views.replay.replay_shard` as a phase 1 unit runs it: the photos as one shard,
  decoded once for a block of ``--views`` views (10).

Rates are views per CPU second of this process (``time.process_time``: one thread, so views/s per core),
with wall-clock rates beside them; ratios are ours over timm's within a round, and the median round is
reported. A per-op profile follows: time per view of each step of ours (decode, resized crop, flip, each
RandAugment op, colour jitter, erasing, mixing, compaction, batching, pixel digests), with a replica of
:func:`pipeline.views.augment.augment` that is checked view by view against the real one (so the profile cannot
drift from the code it explains), timm's transform stage by stage, and the cost of moving a 32-view
chunk from a DataLoader worker (pickling into shared memory and back) against producing it in-process.

    .venv/bin/python bench/loader_speed.py --images DIR [--rounds 3] [--out bench/results/loader_speed.json]
"""

from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.common import RESULTS, add_images_argument, fmt_num, md_table, write_result  # noqa: E402
from bench.loader_profile import ipc_cost, profile_ours, profile_timm  # noqa: E402
from pipeline.shards.decode import DecodedSample, decode_image  # noqa: E402
from pipeline.views.mixing import partners  # noqa: E402
from pipeline.views.pixels import checked_row, pixel_digest, stack_views  # noqa: E402
from pipeline.views.recipe import Recipe  # noqa: E402
from pipeline.views.replay import View, pair_copies, replay_shard  # noqa: E402

SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
SEED = 0
SHARD = "bench"
CACHE_VIEWS = 300  # the checked rows of a DeiT cache (300 views): 1 row in 16 per view


def read_photos(folder: Path, limit: int) -> list[tuple[str, bytes]]:
    """``(key, bytes)`` of the image files under ``folder`` (sorted; the first ``limit``, 0 = all)."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
    if limit:
        files = files[:limit]
    if len(files) < 2:
        raise SystemExit(f"{folder}: need at least 2 photos, found {len(files)}")
    return [(str(p.relative_to(folder).with_suffix("")), p.read_bytes()) for p in files]


def timm_transform(img_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """DeiT's training transform (facebookresearch/deit ``datasets.build_transform``), built by timm.

    timm's Posterize keeps ``4 - int(m / 10 * 4)`` bits, 0 when the magnitude draws 10, which Pillow >= 11
    refuses (older Pillow returned black, as stillroom's replay does): such a draw gets black here too.
    """
    from timm.data import create_transform
    from timm.data.auto_augment import RandAugment

    transform = create_transform(
        img_size,
        is_training=True,
        color_jitter=0.3,
        auto_augment="rand-m9-mstd0.5-inc1",
        interpolation="bicubic",
        re_prob=0.25,
        re_mode="pixel",
        re_count=1,
    )
    for stage in transform.transforms:
        if isinstance(stage, RandAugment):
            for op in stage.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = _posterize_to_black(op.aug_fn)
    return transform


def _posterize_to_black(posterize: Callable) -> Callable:
    def op(img: Image.Image, bits: int, **kwargs: Any) -> Image.Image:
        return Image.new(img.mode, img.size) if bits <= 0 else posterize(img, bits, **kwargs)

    return op


def decode_all(photos: list[tuple[str, bytes]]) -> list[DecodedSample]:
    return [DecodedSample(key, 0, i, decode_image(data), i % 1000) for i, (key, data) in enumerate(photos)]


def timm_views(photos: list[tuple[str, bytes]], transform: Callable) -> Iterator[torch.Tensor]:
    random.seed(SEED)  # timm draws from the global generators: the same views in every round
    torch.manual_seed(SEED)
    for _, data in photos:
        yield transform(Image.open(io.BytesIO(data)).convert("RGB"))


def phase2_views(photos: list[tuple[str, bytes]], recipe: Recipe) -> Iterator[View]:
    """Every pair's ``R`` copies (views ``0..R-1``, RA block 0), each sample decoded once."""
    samples = decode_all(photos)
    views = list(range(recipe.repeats))
    for a, b in partners(SEED, 0, SHARD, len(samples), recipe.repeats, range(len(samples))):
        copies_a, copies_b = pair_copies(samples[a], None if b is None else samples[b], views, recipe, SEED, SHARD)
        yield from copies_a + copies_b


def phase1_views(photos: list[tuple[str, bytes]], recipe: Recipe, views: int) -> Iterator[View]:
    """A unit: the photos as one shard, decoded once, every view of a block of ``views``."""
    yield from replay_shard(decode_all(photos), list(range(views)), recipe, SEED, SHARD, len(photos))


def batch_ours(views: list[View]) -> None:
    """What a worker does with a chunk of views: one compact tensor, and the pixel digests of checked rows."""
    stack_views([v.pixels for v in views])
    for v in views:
        if checked_row(SEED, CACHE_VIEWS, v.view_id, SHARD, v.position):
            pixel_digest(v.pixels)


def batch_timm(views: list[torch.Tensor]) -> None:
    torch.stack(views)  # DataLoader's default_collate


def timed(views: Iterator[Any], batch: Callable[[list], None], chunk: int) -> dict[str, float]:
    """Views per CPU second of this process (one thread: per core) and per wall second, of making the views
    and (``batched_``) of making them and batching them ``chunk`` at a time."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    batch_cpu = batch_wall = 0.0
    pending: list[Any] = []
    n = 0
    for x in views:
        pending.append(x)
        n += 1
        if len(pending) == chunk:
            c, w = time.process_time(), time.perf_counter()
            batch(pending)
            batch_cpu, batch_wall = batch_cpu + time.process_time() - c, batch_wall + time.perf_counter() - w
            pending = []
    c, w = time.process_time(), time.perf_counter()
    if pending:
        batch(pending)
    cpu = time.process_time() - cpu0
    wall = time.perf_counter() - wall0
    batch_cpu, batch_wall = batch_cpu + time.process_time() - c, batch_wall + time.perf_counter() - w
    return {
        "views": n,
        "cpu_s": cpu - batch_cpu,
        "batch_cpu_s": batch_cpu,
        "views_per_cpu_s": n / (cpu - batch_cpu),
        "views_per_s": n / (wall - batch_wall),
        "batched_views_per_cpu_s": n / cpu,
        "batched_views_per_s": n / wall,
    }


RATES = ("views_per_cpu_s", "views_per_s", "batched_views_per_cpu_s", "batched_views_per_s")


def measure_rounds(photos: list[tuple[str, bytes]], args: argparse.Namespace) -> list[dict[str, Any]]:
    recipe = Recipe(img_size=args.img_size, repeats=args.repeats)
    transform = timm_transform(args.img_size)
    runs = {
        "timm": lambda: timed(timm_views(photos, transform), batch_timm, args.chunk),
        "phase2": lambda: timed(phase2_views(photos, recipe), batch_ours, args.chunk),
        "phase1": lambda: timed(phase1_views(photos, recipe, args.views), batch_ours, args.chunk),
    }
    rounds = []
    for r in range(args.rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        got: dict[str, Any] = {name: runs[name]() for name in order}
        for name in ("phase2", "phase1"):
            got[f"{name}_over_timm"] = {rate: got[name][rate] / got["timm"][rate] for rate in RATES}
        rounds.append(got)
        print(
            f"round {r + 1}/{args.rounds}: "
            + ", ".join(f"{n} {got[n]['views_per_cpu_s']:.1f} views/CPU-s" for n in runs)
            + f"; phase 2 / timm {got['phase2_over_timm']['views_per_cpu_s']:.3f}, "
            f"phase 1 / timm {got['phase1_over_timm']['views_per_cpu_s']:.3f}",
            flush=True,
        )
    return rounds


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median, min and max over rounds of each rate and ratio (ratios are taken within a round)."""

    def spread(values: list[float]) -> dict[str, float]:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    out: dict[str, Any] = {}
    for name in ("timm", "phase2", "phase1", "phase2_over_timm", "phase1_over_timm"):
        out[name] = {rate: spread([r[name][rate] for r in rounds]) for rate in RATES}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_images_argument(p)
    p.add_argument("--samples", type=int, default=0, help="photos used (0: all of --images)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the three measurements")
    p.add_argument("--repeats", type=int, default=3, help="R: phase 2 copies per sample (DeiT: 3)")
    p.add_argument("--views", type=int, default=10, help="phase 1 view block (views per decode)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--chunk", type=int, default=32, help="views per chunk (batching, digests, IPC)")
    p.add_argument("--ipc-chunks", type=int, default=32, help="chunks sent through a DataLoader worker")
    p.add_argument("--out", default=str(RESULTS / "loader_speed.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    photos = read_photos(args.images, args.samples)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    rounds = measure_rounds(photos, args)
    recipe = Recipe(img_size=args.img_size, repeats=args.repeats)
    ours = profile_ours(photos, recipe, SEED, SHARD, args.chunk)
    theirs = profile_timm(photos, timm_transform(args.img_size), args.chunk)
    ipc = ipc_cost(photos, recipe, SEED, SHARD, args.chunk, args.ipc_chunks)
    settings = {
        "photos": len(photos),
        "mean_photo_bytes": sum(len(d) for _, d in photos) / len(photos),
        "img_size": args.img_size,
        "repeats": args.repeats,
        "phase1_views": args.views,
        "rounds": args.rounds,
        "chunk": args.chunk,
        "ipc_chunks": args.ipc_chunks,
        "torch_threads": torch.get_num_threads(),
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "total_s": round(time.perf_counter() - t0, 1),
    }
    results = {"summary": summarise(rounds), "rounds": rounds, "profile": ours, "timm_profile": theirs, "ipc": ipc}
    note = (
        "CPU seconds of one process with one torch thread (views/s per core); the machine is shared, so each "
        "ratio is taken within a round and its range over the rounds is shown"
    )
    doc = write_result(args.out, "loader_speed", results, settings=settings, note=note)
    print("\n".join(report_lines(doc)))
    print(f"\nwrote {args.out}")


def _rate_table(s: dict[str, Any], cfg: dict[str, Any]) -> str:
    """Rates (median over rounds) and ratios to timm (median, and their range over rounds)."""

    def ratio(name: str, rate: str) -> str:
        if name == "timm":
            return "1"
        x = s[f"{name}_over_timm"][rate]
        return f"{fmt_num(x['median'], 3)} ({fmt_num(x['min'], 3)}-{fmt_num(x['max'], 3)})"

    labels = {
        "timm": "timm's DeiT transform (a decode per view)",
        "phase2": f"ours, phase 2 (a decode per {cfg.get('repeats', '?')} copies)",
        "phase1": f"ours, phase 1 (a decode per {cfg.get('phase1_views', '?')} views)",
    }
    rows = [
        [
            label,
            s[name]["views_per_cpu_s"]["median"],
            ratio(name, "views_per_cpu_s"),
            s[name]["batched_views_per_cpu_s"]["median"],
            ratio(name, "batched_views_per_cpu_s"),
            s[name]["views_per_s"]["median"],
            ratio(name, "views_per_s"),
        ]
        for name, label in labels.items()
    ]
    headers = [
        "loader",
        "views/CPU-s (per core)",
        "ratio to timm",
        f"with batching by {cfg.get('chunk', '?')}: views/CPU-s",
        "ratio to timm",
        "views/s (wall)",
        "ratio to timm",
    ]
    return md_table(headers, rows)


def report_lines(doc: dict[str, Any]) -> list[str]:
    """The markdown ``bench/report.py`` renders for this benchmark (also printed by the bench itself)."""
    r, cfg = doc["results"], doc.get("settings", {})
    out = [
        f"{cfg.get('photos', '?')} photos (--images, mean {fmt_num(cfg.get('mean_photo_bytes'))} bytes), "
        f"{cfg.get('img_size', '?')} px, one process, one torch thread; median of {cfg.get('rounds', '?')} "
        "interleaved rounds, ratios taken within a round (range over the rounds in brackets). Batching: "
        "timm's `torch.stack` (DataLoader's collation), ours `stack_views` and the pixel digests of checked rows.",
        "",
        _rate_table(r["summary"], cfg),
        "",
        "Per-op profile of ours (phase 2, every copy), per view:",
        "",
        md_table(
            ["step", "calls per view", "ms per call", "ms per view", "share"],
            [[x["step"], x["calls_per_view"], x["ms_per_call"], x["ms_per_view"], x["share"]] for x in r["profile"]],
        ),
        "",
        "timm's transform stage by stage, per view:",
        "",
        md_table(
            ["stage", "ms per view", "share"], [[x["step"], x["ms_per_view"], x["share"]] for x in r["timm_profile"]]
        ),
        "",
        md_table(
            [
                f"{cfg.get('chunk', '?')}-view chunk",
                "MB",
                "ms/view to make (collate)",
                "ms/view to move (both processes)",
                "ms/view in the main process",
            ],
            [
                [x["what"], x["mb"], x["ms_make_per_view"], x["ms_cpu_per_view"], x["ms_main_per_view"]]
                for x in r["ipc"]
            ],
        ),
    ]
    return out


if __name__ == "__main__":
    main()
