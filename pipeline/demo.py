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

from .cache_teacher import CacheConfig
from .cache_teacher import run as run_cache
from .cache_tools import status
from .config import from_mapping, read_yaml, write_resolved
from .pack import pack
from .train import TrainConfig, train

log = logging.getLogger(__name__)
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = (
            _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "model_kwargs" else v
        )
    return out


def load_demo_config(path: str | None, size: str) -> dict[str, Any]:
    cfg = read_yaml(path or str(DEFAULT_CONFIG))
    if size not in ("full", "tiny"):
        raise ValueError(f"--size {size!r}: expected full or tiny")
    tiny = cfg.pop("tiny", {})
    cfg.pop("recipe", None)  # only an anchor for the sections below
    return _merge(cfg, tiny) if size == "tiny" else cfg


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - t0


def run_demo(out: str, size: str = "full", config: str | None = None, console: Console | None = None) -> dict:
    """Run every step and return the table's numbers (also written to ``OUT/demo-results.json``)."""
    console = console or Console(width=110)
    cfg = load_demo_config(config, size)
    out_path = Path(out)
    data = out_path / "data"
    progress = size == "full"

    console.rule("1/5 pack digits into webdataset shards")
    meta, t_pack = _timed(lambda: pack("digits", str(data), **cfg["pack"]))
    train_shards = str(data / meta["train"]["pattern"])
    val_shards = str(data / meta["val"]["pattern"])
    common = {
        "shards": train_shards,
        "val_shards": val_shards,
        "device": "cpu",
        "workers": 1,
        "progress": progress,
        "eval_every": 1000,
    }

    def train_cfg(section: dict[str, Any], name: str, **extra: Any) -> TrainConfig:
        values = from_mapping(
            TrainConfig, {**common, **section, **extra, "out": str(out_path / name)}, f"demo config [{name}]"
        )
        tc = TrainConfig(**values)
        write_resolved(tc, tc.out)
        return tc

    console.rule("2/5 train the teacher (RegNetY, no distillation)")
    teacher_res, t_teacher = _timed(train, train_cfg(cfg["teacher"], "teacher"))
    teacher_ckpt = str(out_path / "teacher" / "last.pth")

    console.rule("3/5 cache-teacher: top-k logits of every view, once")
    cache_url = str(out_path / "cache.zarr")
    cc = CacheConfig(
        **from_mapping(
            CacheConfig,
            {
                **cfg["cache"],
                "shards": train_shards,
                "out": cache_url,
                "teacher_checkpoint": teacher_ckpt,
                "workers": 1,
                "progress": progress,
                "force_new": True,
            },
            "demo config [cache]",
        )
    )
    cache_sum, t_cache = _timed(run_cache, cc)
    st = status(cache_url)

    console.rule("4/5 train-student: tiny DeiT with cached hard distillation")
    student = dict(cfg["student"])
    distilled, t_distilled = _timed(train, train_cfg(student, "student-cached", cache=cache_url, distillation="hard"))

    console.rule("5/5 train-student: the same DeiT without distillation (baseline)")
    plain, t_plain = _timed(
        train,
        train_cfg(
            student,
            "student-none",
            distillation="none",
            recipe=cfg["cache"]["recipe"],
            seed=int(cfg["cache"].get("seed", 0)),
        ),
    )

    rows = [
        ("teacher (RegNetY, trained here)", teacher_res["top1_avg"], None, t_teacher),
        ("cache-teacher (phase 1)", None, None, t_cache),
        ("student, no distillation", plain["top1_avg"], None, t_plain),
        ("student, cached hard distillation", distilled["top1_avg"], distilled.get("top1_dist"), t_distilled),
    ]
    table = Table(
        title=f"stillroom demo ({size}): digits, {meta['train']['num_samples']} train / "
        f"{meta['val']['num_samples']} val images, 32 px, 2 CPU threads"
    )
    for col in ("step", "val top-1 % (avg heads)", "val top-1 % (dist head)", "wall time s"):
        table.add_column(col, justify="right" if col != "step" else "left")
    for name, top1, dist, secs in rows:
        table.add_row(
            name, f"{top1:.2f}" if top1 is not None else "-", f"{dist:.2f}" if dist is not None else "-", f"{secs:.1f}"
        )
    console.print(table)
    views = st["samples_views_cached"]
    console.print(
        f"cache: {views} (sample, view) pairs, {st['bytes_on_disk']} bytes on disk = "
        f"{st['bytes_per_sample_view']} bytes per (sample, view) at K={st['topk']}; "
        f"teacher top-1 vs label on cached (augmented, mixed) views: {st['teacher_top1_vs_label_pct']}%"
    )
    console.print(
        f"pack: {t_pack:.1f}s. Student throughput: cached {distilled['img_per_s']} img/s, "
        f"no distillation {plain['img_per_s']} img/s (last epoch)."
    )
    results = {
        "size": size,
        "teacher_top1": teacher_res["top1_avg"],
        "student_none_top1": plain["top1_avg"],
        "student_cached_top1": distilled["top1_avg"],
        "student_cached_top1_dist_head": distilled.get("top1_dist"),
        "seconds": {
            "pack": t_pack,
            "teacher": t_teacher,
            "cache": t_cache,
            "student_cached": t_distilled,
            "student_none": t_plain,
        },
        "cache_bytes_per_sample_view": st["bytes_per_sample_view"],
        "cache_summary": cache_sum,
        "student_img_per_s": {"cached": distilled["img_per_s"], "none": plain["img_per_s"]},
    }
    os.makedirs(out, exist_ok=True)
    with open(out_path / "demo-results.json", "w") as f:
        json.dump(results, f, indent=1)
    return results
