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

from .cache_status import status
from .cache_teacher import run as run_cache
from .config import checked, from_mapping, read_yaml, write_resolved
from .options import CacheConfig, DemoConfig, ReportConfig, TrainConfig
from .pack import pack
from .preset_files import preset_path
from .report import report
from .train import train

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
            "pack", "1/5 pack digits into webdataset shards", lambda: pack("digits", str(data), **self.preset["pack"])
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
        self.cache_summary = self.timed("cache", "3/5 cache-teacher: top-k logits of every view, once", run_cache, cfg)
        return url


def run_demo(demo: DemoConfig, console: Console | None = None) -> dict:
    """Run every step and return the table's numbers (also written to ``OUT/demo-results.json``)."""
    demo = checked(demo)
    console = console or Console(width=110)
    preset = load_demo_config(demo.preset, demo.size)
    steps = _Steps(demo, preset, console)
    meta = steps.pack()
    teacher = steps.timed(
        "teacher", "2/5 train the teacher (RegNetY, no distillation)", train, steps.train_config("teacher", "teacher")
    )
    cache_url = steps.cache()
    distilled = steps.timed(
        "student_cached",
        "4/5 train-student: tiny DeiT with cached hard distillation",
        train,
        steps.train_config("student", "student-cached", cache=cache_url, distillation="hard"),
    )
    plain = steps.timed(
        "student_none",
        "5/5 train-student: the same DeiT without distillation (baseline)",
        train,
        steps.train_config(
            "student",
            "student-none",
            distillation="none",
            recipe=preset["cache"]["recipe"],
            seed=preset["cache"].get("seed", 0),
        ),
    )
    st = status(cache_url)
    results = {
        "size": demo.size,
        "teacher_top1": teacher["top1_avg"],
        "student_none_top1": plain["top1_avg"],
        "student_cached_top1": distilled["top1_avg"],
        "student_cached_top1_dist_head": distilled.get("top1_dist"),
        "seconds": steps.seconds,
        "cache_bytes_per_sample_view": st["bytes_per_sample_view"],
        "cache_summary": steps.cache_summary,
        "student_img_per_s": {"cached": distilled["img_per_s"], "none": plain["img_per_s"]},
    }
    _print_table(console, demo.size, meta, results, distilled, st)
    results["pictures"] = _pictures(steps.out, cache_url, console)
    os.makedirs(demo.out, exist_ok=True)
    with open(Path(demo.out) / "demo-results.json", "w") as f:
        json.dump(results, f, indent=1)
    return results


def _pictures(out: Path, cache_url: str, console: Console) -> list[str]:
    """The students' curves overlaid (the baseline against cached distillation) and the cache, as PNGs in
    ``OUT/pictures``: what ``stillroom report`` draws from any run folder and cache."""
    cfg = ReportConfig(
        run=[str(out / "student-none"), str(out / "student-cached")],
        label=["student, no distillation", "student, cached hard distillation"],
        cache=cache_url,
        out=str(out / "pictures"),
    )
    paths = report(cfg)
    console.print(f"pictures ({len(paths)}) in {cfg.out}: {', '.join(os.path.basename(p) for p in paths)}")
    return paths


def _print_table(console: Console, size: str, meta: dict, results: dict, distilled: dict, st: dict) -> None:
    secs = results["seconds"]
    rows = [
        ("teacher (RegNetY, trained here)", results["teacher_top1"], None, secs["teacher"]),
        ("cache-teacher (phase 1)", None, None, secs["cache"]),
        ("student, no distillation", results["student_none_top1"], None, secs["student_none"]),
        (
            "student, cached hard distillation",
            distilled["top1_avg"],
            distilled.get("top1_dist"),
            secs["student_cached"],
        ),
    ]
    table = Table(
        title=f"stillroom demo ({size}): digits, {meta['train']['num_samples']} train / "
        f"{meta['val']['num_samples']} val images, 32 px, 2 CPU threads"
    )
    for col in ("step", "val top-1 % (avg heads)", "val top-1 % (dist head)", "wall time s"):
        table.add_column(col, justify="right" if col != "step" else "left")
    for name, top1, dist, s in rows:
        table.add_row(name, "-" if top1 is None else f"{top1:.2f}", "-" if dist is None else f"{dist:.2f}", f"{s:.1f}")
    console.print(table)
    console.print(
        f"cache: {st['samples_views_cached']} (sample, view) pairs, {st['bytes_on_disk']} bytes on disk = "
        f"{st['bytes_per_sample_view']} bytes per (sample, view) at K={st['topk']}; "
        f"teacher top-1 vs label on cached (augmented, mixed) views: {st['teacher_top1_vs_label_pct']}%"
    )
    img_s = results["student_img_per_s"]
    console.print(
        f"pack: {secs['pack']:.1f}s. Student throughput: cached {img_s['cached']} img/s, "
        f"no distillation {img_s['none']} img/s (last epoch)."
    )
