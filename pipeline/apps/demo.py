"""``stillroom demo``: pack real digits, train a RegNetY teacher, cache it, train DeiT students with
and without cached distillation, and print one table of numbers measured in this run."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline.apps.report import report
from pipeline.config import checked, from_mapping, read_yaml, write_resolved
from pipeline.errors import ConfigError
from pipeline.inspection.status import status
from pipeline.options import CacheConfig, DemoConfig, ReportConfig
from pipeline.phase1.cache_teacher import run as run_cache
from pipeline.phase2.train import train
from pipeline.preset_files import preset_path
from pipeline.shards.pack import pack
from pipeline.train_options import TrainConfig

log = logging.getLogger(__name__)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = (
            _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "model_kwargs" else v
        )
    return out


def load_demo_config(path: str | None, size: str) -> dict[str, Any]:
    cfg = read_yaml(path or str(preset_path("demo")))
    tiny = cfg.pop("tiny", {})
    cfg.pop("recipe", None)  # only an anchor for the sections below
    return _merge(cfg, tiny) if size == "tiny" else cfg


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - t0


class _Steps:
    """The demo's steps, sharing one working folder and the settings of ``configs/demo.yaml``."""

    def __init__(self, demo: DemoConfig, preset: dict[str, Any], console: Console):
        self.out, self.preset, self.console = Path(demo.out), preset, console
        self.progress = "auto" if demo.size == "full" else "off"
        self.seconds: dict[str, float] = {}
        self.common: dict[str, Any] = {}

    def timed(self, name: str, title: str, fn: Any, *args: Any) -> Any:
        self.console.rule(title)
        result, self.seconds[name] = _timed(fn, *args)
        return result

    def pack(self) -> dict[str, Any]:
        data = self.out / "data"
        meta = self.timed(
            "pack", "1. pack digits into webdataset shards", lambda: pack("digits", str(data), **self.preset["pack"])
        )
        self.common = {
            "shards": str(data / meta["train"]["pattern"]),
            "val_shards": str(data / meta["val"]["pattern"]),
            "device": "cpu",
            "workers": 1,
            "progress": self.progress,
            "eval_every": 1000,
        }
        return meta

    def train_config(self, section: str, name: str, **extra: Any) -> TrainConfig:
        mapping = {**self.common, **self.preset[section], **extra, "out": str(self.out / name), "force_new": True}
        cfg = TrainConfig(**from_mapping(TrainConfig, mapping, f"demo config [{name}]"))
        write_resolved(cfg, cfg.out)
        return cfg

    def cache(self) -> str:
        url = str(self.out / "cache.zarr")
        mapping = {
            **self.preset["cache"],
            "shards": self.common["shards"],
            "out": url,
            "teacher_checkpoint": str(self.out / "teacher" / "last.pth"),
            "workers": 1,
            "progress": self.progress,
            "force_new": True,
        }
        cfg = CacheConfig(**from_mapping(CacheConfig, mapping, "demo config [cache]"))
        self.cache_summary = self.timed("cache", "3. cache-teacher: top-k logits of every view, once", run_cache, cfg)
        return url


def _students(steps: _Steps, preset: dict[str, Any], cache_url: str) -> dict[str, list[dict]]:
    """Both students once per run seed (initial weights, drop-path noise, batch order; the views are the
    cache's): one seed's gap between them is within the seed-to-seed spread of either, so the table shows
    every seed and their mean."""
    seeds = preset.get("seeds", [0])
    runs: dict[str, list[dict]] = {"cached": [], "none": []}
    plain = {"distillation": "none", "recipe": preset["cache"]["recipe"], "seed": preset["cache"].get("seed", 0)}
    for i, seed in enumerate(seeds):
        for kind, extra, what in (
            ("cached", {"cache": cache_url, "distillation": "hard"}, "cached hard distillation"),
            ("none", plain, "no distillation (baseline)"),
        ):
            step = 4 + 2 * i + (kind == "none")
            cfg = steps.train_config("student", f"student-{kind}-s{seed}", run_seed=seed, **extra)
            title = f"{step}. train-student, run seed {seed}: tiny DeiT, {what}"
            runs[kind].append(steps.timed(f"student_{kind}_s{seed}", title, train, cfg))
    return runs


# Left in the demo's folder before anything else: a folder the demo may write into again.
DEMO_MARK = ".stillroom-demo"


def claim_folder(out: Path) -> None:
    """Make ``out`` the demo's own folder, or refuse: the demo writes only into a new or empty folder, or one
    an earlier demo wrote (its mark, or its ``demo-results.json``), so a user's files there are never replaced.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file, not a folder")
    if out.is_dir() and not (out / DEMO_MARK).exists() and not (out / "demo-results.json").exists():
        found = [str(p.relative_to(out)) for p, _ in zip(sorted(out.rglob("*")), range(4), strict=False)]
        if found:
            raise ConfigError(
                f"--out {str(out)!r} holds files the demo did not write ({', '.join(found[:3])}"
                f"{', ...' if len(found) > 3 else ''}); the demo writes only into a new or empty folder, or one an "
                "earlier demo wrote: give another --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARK).write_text("written by stillroom demo: a later demo may write into this folder again\n")


def run_demo(demo: DemoConfig, console: Console | None = None) -> dict:
    """Run every step and return the table's numbers (also written to ``OUT/demo-results.json``)."""
    demo = checked(demo)
    claim_folder(Path(demo.out))
    console = console or Console(width=110)
    preset = load_demo_config(demo.preset, demo.size)
    steps = _Steps(demo, preset, console)
    meta = steps.pack()
    teacher = steps.timed(
        "teacher", "2. train the teacher (RegNetY, no distillation)", train, steps.train_config("teacher", "teacher")
    )
    cache_url = steps.cache()
    runs = _students(steps, preset, cache_url)
    st = status(cache_url)
    results = {
        "size": demo.size,
        "seeds": preset.get("seeds", [0]),
        "teacher_top1": teacher["top1_avg"],
        "student_none_top1": [r["top1_avg"] for r in runs["none"]],
        "student_cached_top1": [r["top1_avg"] for r in runs["cached"]],
        "student_cached_top1_dist_head": [r.get("top1_dist") for r in runs["cached"]],
        "seconds": steps.seconds,
        "cache_bytes_per_sample_view": st["bytes_per_sample_view"],
        "cache_summary": steps.cache_summary,
        "student_img_per_s": {k: [r["img_per_s"] for r in v] for k, v in runs.items()},
    }
    _print_table(console, demo.size, meta, results, st)
    results["pictures"] = _pictures(steps.out, results["seeds"], cache_url, console)
    os.makedirs(demo.out, exist_ok=True)
    with open(Path(demo.out) / "demo-results.json", "w") as f:
        json.dump(results, f, indent=1)
    return results


def _pictures(out: Path, seeds: list[int], cache_url: str, console: Console) -> list[str]:
    """The students' curves overlaid (the baseline against cached distillation, every seed) and the cache, as
    PNGs in ``OUT/pictures``: what ``stillroom report`` draws from any run folder and cache."""
    kinds = (("none", "no distillation"), ("cached", "cached hard distillation"))
    cfg = ReportConfig(
        run=[str(out / f"student-{kind}-s{seed}") for kind, _ in kinds for seed in seeds],
        label=[f"{what}, seed {seed}" for _, what in kinds for seed in seeds],
        cache=cache_url,
        out=str(out / "pictures"),
    )
    paths = report(cfg)
    console.print(f"pictures ({len(paths)}) in {cfg.out}: {', '.join(os.path.basename(p) for p in paths)}")
    return paths


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _seeds(values: list[float | None]) -> str:
    return " / ".join("-" if v is None else f"{v:.2f}" for v in values)


def _print_table(console: Console, size: str, meta: dict, results: dict, st: dict) -> None:
    secs, seeds = results["seconds"], results["seeds"]
    none, cached = results["student_none_top1"], results["student_cached_top1"]
    dist = results["student_cached_top1_dist_head"]
    student_s = {k: sum(secs[f"student_{k}_s{s}"] for s in seeds) for k in ("none", "cached")}
    rows = [
        ("teacher (RegNetY, trained here)", f"{results['teacher_top1']:.2f}", "-", "-", secs["teacher"]),
        ("cache-teacher (phase 1)", "-", "-", "-", secs["cache"]),
        ("student, no distillation", f"{_mean(none):.2f}", _seeds(none), "-", student_s["none"]),
        (
            "student, cached hard distillation",
            f"{_mean(cached):.2f}",
            _seeds(cached),
            _seeds(dist),
            student_s["cached"],
        ),
    ]
    table = Table(
        title=f"stillroom demo ({size}): digits, {meta['train']['num_samples']} train / "
        f"{meta['val']['num_samples']} val images, 32 px, 2 CPU threads, students with run seeds "
        f"{', '.join(map(str, seeds))}"
    )
    columns = ("step", "val top-1 % mean", "per seed", "dist head", "time s")
    for col in columns:
        table.add_column(col, justify="right" if col != "step" else "left")
    for name, *cells, s in rows:
        table.add_row(name, *cells, f"{s:.1f}")
    console.print(table)
    gaps = [c - n for c, n in zip(cached, none, strict=True)]
    console.print(
        f"gain of cached distillation: {_mean(gaps):+.2f} points on average (per seed: "
        f"{' / '.join(f'{g:+.2f}' for g in gaps)}); one student's top-1 moves by several points from seed to "
        "seed and from CPU to CPU (float rounding differs), so compare means, not one run."
    )
    console.print(
        f"cache: {st['samples_views_cached']} (sample, view) pairs, {st['bytes_on_disk']} bytes on disk = "
        f"{st['bytes_per_sample_view']} bytes per (sample, view) at K={st['topk']}; "
        f"teacher top-1 vs label on cached (augmented, mixed) views: {st['teacher_top1_vs_label_pct']}%"
    )
    img_s = results["student_img_per_s"]
    console.print(
        f"pack: {secs['pack']:.1f}s. Student throughput (last epoch, per seed): cached {_seeds(img_s['cached'])} "
        f"img/s, no distillation {_seeds(img_s['none'])} img/s."
    )
