"""Student accuracy on digits: cached hard, cached soft, live-teacher hard, no distillation.

Uses the demo's settings (``configs/demo.yaml``: pack, teacher, cache and student sections) with
fewer student epochs (``--epochs``). One teacher (trained here, or ``--teacher-checkpoint``) and one
cache (only the view blocks the run needs) are shared by every student run.

Seeds: the cache fixes the data seed (the views), so a bench seed ``s`` varies what it can without
invalidating the cache: the student's initial weights, drop-path noise and the batch order
(``stable_seed('init'|'noise'|'batches', ...)`` get ``s`` mixed in; ``s = 0`` is exactly the
unpatched pipeline).

    .venv/bin/python bench/accuracy.py [--seeds 2] [--epochs 10] [--tau 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import pipeline.train as train_mod  # noqa: E402
from bench.common import RESULTS, md_table, write_result  # noqa: E402
from pipeline.cache_teacher import CacheConfig  # noqa: E402
from pipeline.cache_teacher import run as run_cache  # noqa: E402
from pipeline.config import from_mapping  # noqa: E402
from pipeline.demo import load_demo_config  # noqa: E402
from pipeline.pack import pack  # noqa: E402
from pipeline.seeding import stable_seed  # noqa: E402
from pipeline.train import TrainConfig, train  # noqa: E402

MODES = ("cached hard", "cached soft", "live hard", "none")


def _seeded(run_seed: int):
    def seed_fn(tag: str, *parts):
        if run_seed and tag in ("init", "batches", "noise"):
            return stable_seed(tag, *parts, "bench-seed", run_seed)
        return stable_seed(tag, *parts)

    return seed_fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--tau", type=float, default=1.0, help="soft distillation temperature (must be cached)")
    ap.add_argument("--teacher-epochs", type=int, default=None, help="default: the demo's")
    ap.add_argument("--teacher-checkpoint", default=None)
    ap.add_argument("--out", default=str(RESULTS / "accuracy.json"))
    ap.add_argument("--note", default="", help="free text stored with the result (e.g. machine load)")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    cfg = load_demo_config(None, "full")
    if args.tau not in [float(t) for t in cfg["cache"]["temperatures"]]:
        ap.error(f"--tau {args.tau} is not a cached temperature {cfg['cache']['temperatures']}")
    results: dict[str, list[float]] = {m: [] for m in MODES}
    secs: dict[str, list[float]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="stillroom-acc-") as d:
        tmp = Path(d)
        meta = pack("digits", str(tmp / "data"), **cfg["pack"])
        common = {
            "shards": str(tmp / "data" / meta["train"]["pattern"]),
            "val_shards": str(tmp / "data" / meta["val"]["pattern"]),
            "device": "cpu",
            "workers": 1,
            "progress": False,
            "eval_every": 1000,
        }

        def tcfg(section: dict, name: str, **extra) -> TrainConfig:
            values = from_mapping(TrainConfig, {**common, **section, **extra, "out": str(tmp / name)}, name)
            return TrainConfig(**values)

        t0 = time.perf_counter()
        ckpt = args.teacher_checkpoint
        if not ckpt:
            section = dict(cfg["teacher"])
            if args.teacher_epochs:
                section["epochs"] = args.teacher_epochs
            teacher_res = train(tcfg(section, "teacher"))
            ckpt = str(tmp / "teacher" / "last.pth")
            teacher_top1 = teacher_res.get("top1_avg")
        else:
            teacher_top1 = None
        t_teacher = time.perf_counter() - t0
        cache_url = str(tmp / "cache.zarr")
        views, block = int(cfg["cache"]["views"]), int(cfg["cache"]["view_block"])
        stop = min(views, -(-args.epochs // block) * block)
        t0 = time.perf_counter()
        run_cache(
            CacheConfig(
                **from_mapping(
                    CacheConfig,
                    {
                        **cfg["cache"],
                        "shards": common["shards"],
                        "out": cache_url,
                        "teacher_checkpoint": ckpt,
                        "workers": 1,
                        "progress": False,
                        "view_range": f"0:{stop}" if stop < views else None,
                    },
                    "cache",
                )
            )
        )
        t_cache = time.perf_counter() - t0
        student = {**cfg["student"], "epochs": args.epochs}
        extra = {
            "cached hard": {"cache": cache_url, "distillation": "hard"},
            "cached soft": {"cache": cache_url, "distillation": "soft", "tau": args.tau},
            "live hard": {
                "cache": cache_url,
                "distillation": "hard",
                "teacher_mode": "live",
                "teacher": cfg["cache"]["teacher"],
                "teacher_checkpoint": ckpt,
            },
            "none": {
                "distillation": "none",
                "recipe": cfg["cache"]["recipe"],
                "seed": int(cfg["cache"].get("seed", 0)),
            },
        }
        real_seed = train_mod.stable_seed
        try:
            for seed in range(args.seeds):
                train_mod.stable_seed = _seeded(seed)
                for mode in MODES:
                    t0 = time.perf_counter()
                    res = train(tcfg(student, f"s{seed}-{mode.replace(' ', '-')}", **extra[mode]))
                    secs[mode].append(time.perf_counter() - t0)
                    results[mode].append(float(res["top1_avg"]))
                    print(f"seed {seed} {mode}: top-1 {res['top1_avg']:.2f}% ({secs[mode][-1]:.0f}s)", flush=True)
        finally:
            train_mod.stable_seed = real_seed

    def stats(xs: list[float]) -> tuple[float, float]:
        return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0

    rows, out = [], {}
    base = stats(results["none"])[0]
    for mode in MODES:
        m, s = stats(results[mode])
        out[mode] = {"top1": results[mode], "mean": m, "std": s, "seconds": secs[mode]}
        rows.append(
            [
                mode if mode != "cached soft" else f"cached soft (tau {args.tau:g})",
                f"{m:.2f} ± {s:.2f}",
                len(results[mode]),
                m - base,
                statistics.mean(secs[mode]),
            ]
        )
    print(
        f"\n## Student val top-1 on digits ({args.epochs} epochs, {args.seeds} seeds; teacher top-1 {teacher_top1})\n"
    )
    print(md_table(["mode", "val top-1 % (mean ± std)", "runs", "vs no distillation", "s per run"], rows))
    write_result(
        args.out,
        "accuracy",
        out,
        epochs=args.epochs,
        seeds=args.seeds,
        tau=args.tau,
        teacher_top1=teacher_top1,
        teacher_s=round(t_teacher, 1),
        cache_s=round(t_cache, 1),
        note=args.note,
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
