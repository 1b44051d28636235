"""Student accuracy on digits by mode: repeated augmentation R = 1 vs R = 3, cached vs live, no teacher, one
teacher vs two (the demo's RegNetY and a RegNetX trained the same way, cached over the same views).

Uses the demo's settings (``configs/demo.yaml``: pack, teacher, cache and student sections) for
``--epochs`` student epochs. One teacher (trained here, or ``--teacher-checkpoint``) and one cache
are shared by every student run; the cache is made for R = 3 (its mixing partners are grouped for
DeiT's repeated augmentation) with as many views as epochs, rounded up to a multiple of 3, so no run
reuses a view. R = 1 runs train every sample every epoch on the same cache.

Seeds: the cache fixes the views, so seed ``s`` is ``train-student --run-seed s``: the student's
initial weights, drop-path noise and batch order.

    .venv/bin/python bench/accuracy.py [--seeds 3] [--epochs 30] [--modes none "cached hard" "cached hard 2 teachers"]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import RESULTS, md_table, write_result  # noqa: E402
from pipeline.apps.demo import load_demo_config  # noqa: E402
from pipeline.config import from_mapping  # noqa: E402
from pipeline.options import CacheConfig  # noqa: E402
from pipeline.phase1.cache_teacher import run as run_cache  # noqa: E402
from pipeline.phase2.train import train  # noqa: E402
from pipeline.shards.pack import pack  # noqa: E402
from pipeline.train_options import TrainConfig  # noqa: E402

MODES = ("none", "cached hard", "cached hard R3", "cached soft", "live hard", "cached hard 2 teachers")
SECOND_TEACHER = "regnetx_002"  # a second small CNN, trained as the demo trains its RegNetY


def mode_options(mode: str, caches: list[str], preset: dict[str, Any], teacher: str, tau: float) -> dict[str, Any]:
    """The train-student options that make ``mode`` (``caches``: the demo teacher's, then the second's)."""
    if mode == "none":  # no teacher, the same views and seed as the cache's
        return {"distillation": "none", "recipe": preset["cache"]["recipe"], "seed": preset["cache"].get("seed", 0)}
    cache = caches if "2 teachers" in mode else caches[:1]
    options: dict[str, Any] = {"cache": cache, "distillation": mode.split()[1], "repeats": 3 if "R3" in mode else 1}
    if mode == "cached soft":
        options["tau"] = tau
    if mode == "live hard":
        options.update(teacher_mode="live", teacher=[preset["cache"]["teacher"]], teacher_checkpoint=[teacher])
    return options


class Bench:
    """Shared data, teacher and cache; one student run per (seed, mode)."""

    def __init__(self, tmp: Path, args: argparse.Namespace):
        self.tmp, self.args = tmp, args
        self.preset = load_demo_config(None, "full")
        meta = pack("digits", str(tmp / "data"), **self.preset["pack"])
        self.common = {
            "shards": str(tmp / "data" / meta["train"]["pattern"]),
            "val_shards": str(tmp / "data" / meta["val"]["pattern"]),
            "device": "cpu",
            "workers": 1,
            "progress": "off",
            "eval_every": 1000,
        }

    def config(self, section: dict[str, Any], name: str, **extra: Any) -> TrainConfig:
        mapping = {**self.common, **section, **extra, "out": str(self.tmp / name)}
        return TrainConfig(**from_mapping(TrainConfig, mapping, name))

    def teacher(self, model: str | None = None) -> tuple[str, float | None]:
        """The demo's teacher (or ``model`` trained the same way); ``--teacher-checkpoint`` replaces the first."""
        if self.args.teacher_checkpoint and model is None:
            return self.args.teacher_checkpoint, None
        section = dict(self.preset["teacher"], **({"model": model} if model else {}))
        if self.args.teacher_epochs:
            section["epochs"] = self.args.teacher_epochs
        name = f"teacher-{model}" if model else "teacher"
        result = train(self.config(section, name))
        return str(self.tmp / name / "last.pth"), result.get("top1_avg")

    def cache(self, teacher: str, like: str | None = None, model: str | None = None) -> str:
        """The demo teacher's cache, or (``like``) another teacher's over the very same views."""
        url = str(self.tmp / (f"cache-{model}.zarr" if like else "cache.zarr"))
        views = -(-self.args.epochs // 3) * 3
        mapping = {
            **self.preset["cache"],
            "shards": self.common["shards"],
            "out": url,
            "teacher_checkpoint": teacher,
            "workers": 1,
            "progress": "off",
            "views": views,
            "view_block": 3,
            "repeats": 3,
        }
        if like:
            mapping = {**mapping, "like": like, "teacher": model}
        run_cache(CacheConfig(**from_mapping(CacheConfig, mapping, "cache")))
        return url


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    return fn(*args), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--modes", nargs="+", default=["none", "cached hard", "cached hard R3"], choices=MODES)
    ap.add_argument("--tau", type=float, default=1.0, help="soft distillation temperature (must be cached)")
    ap.add_argument("--teacher-epochs", type=int, default=None, help="default: the demo's")
    ap.add_argument("--teacher-checkpoint", default=None)
    ap.add_argument("--out", default=str(RESULTS / "accuracy.json"))
    ap.add_argument("--note", default="", help="free text stored with the result (e.g. machine load)")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    results: dict[str, dict[str, list[float]]] = {m: {"top1": [], "seconds": []} for m in args.modes}
    with tempfile.TemporaryDirectory(prefix="stillroom-acc-") as d:
        bench = Bench(Path(d), args)
        (teacher, teacher_top1), t_teacher = _timed(bench.teacher)
        caches, t_cache = _timed(lambda: [bench.cache(teacher)])
        second_top1 = None
        if any("2 teachers" in m for m in args.modes):
            second, second_top1 = bench.teacher(SECOND_TEACHER)
            caches.append(bench.cache(second, like=caches[0], model=SECOND_TEACHER))
        student = {**bench.preset["student"], "epochs": args.epochs}
        for seed in range(args.seeds):
            for mode in args.modes:
                extra = mode_options(mode, caches, bench.preset, teacher, args.tau)
                cfg = bench.config(student, f"s{seed}-{mode.replace(' ', '-')}", run_seed=seed, **extra)
                res, secs = _timed(train, cfg)
                results[mode]["top1"].append(float(res["top1_avg"]))
                results[mode]["seconds"].append(secs)
                print(f"seed {seed} {mode}: top-1 {res['top1_avg']:.2f}% ({secs:.0f}s)", flush=True)
    out = {m: {**r, "mean": statistics.mean(r["top1"]), "std": _std(r["top1"])} for m, r in results.items()}
    rows = [[m, f"{v['mean']:.2f} ± {v['std']:.2f}", ", ".join(f"{x:.2f}" for x in v["top1"])] for m, v in out.items()]
    print(f"\nStudent val top-1 on digits ({args.epochs} epochs, {args.seeds} seeds; teacher {teacher_top1})\n")
    print(md_table(["mode", "val top-1 % (mean ± std)", "per seed"], rows))
    write_result(
        args.out,
        "accuracy",
        out,
        epochs=args.epochs,
        seeds=args.seeds,
        tau=args.tau,
        teacher_top1=teacher_top1,
        second_teacher=SECOND_TEACHER if second_top1 is not None else None,
        second_teacher_top1=second_top1,
        teacher_s=round(t_teacher, 1),
        cache_s=round(t_cache, 1),
        student=student["model_kwargs"],
        note=args.note,
    )


def _std(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


if __name__ == "__main__":
    main()
