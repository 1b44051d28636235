"""Phase 2 speed: student training images/s with cached targets, a live teacher, and no teacher.

Packs the real photos of ``--images DIR`` (e.g. 200 ImageNet JPEGs with a
``classes.tsv`` of the 1000 classes) into
shards in a temp dir, saves a randomly initialised ``regnety_016`` teacher, caches a few views of
it (DeiT recipe, 224 px), then trains ``deit_tiny_distilled_patch16_224`` on the same replayed
views with the same batch size, workers and number of steps in three modes, side by side:

* ``cached``: hard distillation from the cache (the teacher never runs);
* ``live``: hard distillation, the teacher run in the loop on the same pixels;
* ``none``: no distillation (the student alone: the upper bound).

Images/s is measured from the per-step timestamps of ``metrics.jsonl`` (steady state: the first
step of each epoch, which waits for the loader to start and fill its shuffle buffer, is left out),
at the fastest single step (the least disturbed by other processes on a shared machine), and over
whole epochs. Modes are run in interleaved rounds and the best round is kept, so a
burst of load from other processes on the machine hits all modes alike; the CPU seconds of each
run (this process and its loader workers) are reported too, as they depend less on such load.
Prints a markdown table with the ratios, the machine and the command, and writes JSON.

    .venv/bin/python bench/phase2_speed.py --images DIR [--steps 5] [--rounds 2] [--out bench/results/phase2.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from bench.common import (  # noqa: E402
    IMAGENET_CLASSES,
    RESULTS,
    add_images_argument,
    command,
    machine,
    md_table,
    photo_folder_setup,
    write_result,
)
from pipeline.phase1.cache_teacher import CacheConfig  # noqa: E402
from pipeline.phase1.cache_teacher import run as cache_teacher  # noqa: E402
from pipeline.phase2.train import TrainConfig, train  # noqa: E402

TEACHER = "regnety_016"
STUDENT = "deit_tiny_distilled_patch16_224"
NUM_CLASSES = IMAGENET_CLASSES
MODES = {  # mode -> (distillation, teacher_mode)
    "cached": ("hard", "cached"),
    "live": ("hard", "live"),
    "none": ("none", "cached"),
}


def step_intervals(metrics: list[dict]) -> list[float]:
    """Seconds between consecutive steps within each epoch (so the first step of every epoch, which
    waits for the loader to start and fill its shuffle buffer, is left out)."""
    steps = [m for m in metrics if m["event"] == "train"]
    return [cur["time"] - prev["time"] for prev, cur in itertools.pairwise(steps) if cur["epoch"] == prev["epoch"]]


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its reaped children (the loader workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def train_run(base: TrainConfig, mode: str, out: Path) -> dict:
    distillation, teacher_mode = MODES[mode]
    cfg = dataclasses.replace(base, out=str(out), distillation=distillation, teacher_mode=teacher_mode)
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    train(cfg)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [m for m in metrics if m["event"] == "epoch"]
    intervals = step_intervals(metrics)
    return {
        "mode": mode,
        "img_per_s": len(intervals) * cfg.batch_size / sum(intervals),
        "best_step_img_per_s": cfg.batch_size / min(intervals),
        "steady_steps": len(intervals),
        "step_s": intervals,
        "epoch_img_per_s": sum(e["steps"] for e in epochs) * cfg.batch_size / sum(e["epoch_s"] for e in epochs),
        "steps": sum(e["steps"] for e in epochs),
        "epoch_s": [e["epoch_s"] for e in epochs],
        "final_loss": epochs[-1]["train_loss"],
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),  # this process and its (reaped) loader workers, start-up included
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="max_steps_per_epoch of every run")
    p.add_argument("--epochs", type=int, default=1, help="epochs per run (one cached view each)")
    p.add_argument("--views", type=int, default=2, help="views in the cache (>= epochs)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the three modes; best kept")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--per-shard", type=int, default=50, help="samples per shard (200 images in total)")
    add_images_argument(p)
    p.add_argument("--out", default=str(RESULTS / "phase2.json"))
    args = p.parse_args()
    if args.views < args.epochs:
        p.error("--views must be >= --epochs (each epoch trains on its own cached view)")
    logging.basicConfig(level=logging.WARNING)
    load_before = os.getloadavg()

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stillroom-bench2-") as tmp:
        t = Path(tmp)
        meta, shards, teacher = photo_folder_setup(t, args.per_shard, TEACHER, args.images)

        t0 = time.perf_counter()
        cache = str(t / "cache.zarr")
        summary = cache_teacher(
            CacheConfig(
                shards=shards,
                out=cache,
                teacher=TEACHER,
                teacher_checkpoint=teacher,
                num_classes=NUM_CLASSES,
                recipe="deit",
                img_size=args.img_size,
                views=args.views,
                view_block=args.views,
                topk=10,
                batch_size=args.batch_size,
                workers=args.workers,
                progress="off",
            )
        )
        cache_s = time.perf_counter() - t0

        base = TrainConfig(
            shards=shards,
            cache=cache,
            model=STUDENT,
            model_kwargs={"img_size": args.img_size},
            img_size=args.img_size,
            teacher=TEACHER,
            teacher_checkpoint=teacher,
            epochs=args.epochs,
            batch_size=args.batch_size,
            workers=args.workers,
            max_steps_per_epoch=args.steps,
            warmup_epochs=0,
            eval_every=0,
            log_every=1,
            progress="off",
        )
        rounds: list[dict[str, dict]] = []
        for r in range(args.rounds):  # alternate the order so a load burst does not always hit the same mode
            order = list(MODES) if r % 2 == 0 else list(reversed(MODES))
            rounds.append({mode: train_run(base, mode, t / f"run-{mode}-{r}") for mode in order})

    best = {mode: max((rd[mode] for rd in rounds), key=lambda x: x["img_per_s"]) for mode in MODES}
    fastest = {mode: max(rd[mode]["best_step_img_per_s"] for rd in rounds) for mode in MODES}
    cached, live, none = (best[m]["img_per_s"] for m in ("cached", "live", "none"))
    mach = machine()
    cmd = command()
    settings = {
        "student": STUDENT,
        "teacher": TEACHER,
        "num_classes": NUM_CLASSES,
        "img_size": args.img_size,
        "recipe": "deit",
        "samples": meta["num_samples"],
        "shards": len(meta["shards"]),
        "batch_size": args.batch_size,
        "steps_per_epoch": args.steps,
        "epochs": args.epochs,
        "workers": args.workers,
        "rounds": args.rounds,
        "cache_views": args.views,
        "topk": 10,
        "cache_build_s": round(cache_s, 1),
        "cache_views_per_s": round(summary["views"] / cache_s, 2),
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "total_s": round(time.perf_counter() - t_start, 1),
    }
    ratios = {
        "cached_over_none": cached / none,
        "cached_over_live": cached / live,
        "live_over_none": live / none,
        "fastest_step": {
            "cached_over_none": fastest["cached"] / fastest["none"],
            "cached_over_live": fastest["cached"] / fastest["live"],
            "live_over_none": fastest["live"] / fastest["none"],
        },
    }
    write_result(args.out, "phase2_speed", {"best": best, "rounds": rounds, "ratios": ratios}, settings=settings)

    labels = {
        "cached": "hard distillation, cached targets",
        "live": f"hard distillation, live {TEACHER}",
        "none": "no distillation",
    }
    rows = [
        [
            labels[m],
            round(best[m]["img_per_s"], 2),
            round(fastest[m], 2),
            round(best[m]["epoch_img_per_s"], 2),
            best[m]["steady_steps"],
            round(best[m]["img_per_s"] / none, 3),
            round(best[m]["cpu_s"], 1),
        ]
        for m in MODES
    ]
    print(
        f"Phase 2 speed: `{STUDENT}` ({NUM_CLASSES} classes), {args.img_size} px, DeiT recipe, "
        f"{meta['num_samples']} photos (--images) in {len(meta['shards'])} shards, batch {args.batch_size}, "
        f"{args.epochs} epochs x {args.steps} steps, {args.workers} loader workers, CPU, best of {args.rounds} "
        "round(s).\n"
    )
    headers = [
        "mode",
        "img/s (steady)",
        "img/s (fastest step)",
        "img/s (whole epochs)",
        "timed steps",
        "steady ratio to none",
        "CPU s (whole run)",
    ]
    print(md_table(headers, rows))
    print(
        f"\n- steady: cached / none {ratios['cached_over_none']:.2f}, cached / live {ratios['cached_over_live']:.2f}, "
        f"live / none {ratios['live_over_none']:.2f}; fastest step (least disturbed by other load): cached / none "
        f"{fastest['cached'] / fastest['none']:.2f}, cached / live {fastest['cached'] / fastest['live']:.2f}, "
        f"live / none {fastest['live'] / fastest['none']:.2f}"
        f"\n- cache build ({summary['views']} views of {TEACHER}): {cache_s:.1f}s"
        f"\n- machine: {mach['cpu']}, {mach['logical_cores']} cores ({mach['usable_cores']} usable), "
        f"torch {mach.get('torch')} with {mach.get('torch_threads')} intra-op threads; load average before "
        f"{load_before[0]:.1f}, after {settings['load_avg_after'][0]:.1f}"
        f"\n- command: `{cmd}`\n\nwrote {args.out}"
    )


if __name__ == "__main__":
    main()
