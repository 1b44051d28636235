"""The measurements of the GPU check, one function each (``bench/gpu_check.py`` runs them, each guarded).

Each returns a flat dict of what it measured; on CUDA each reports the peak GPU memory it allocated
(``torch.cuda.max_memory_allocated`` since its start). Data: ImageNet-shaped synthetic JPEGs (500x375,
``bench/scale.py``'s generator), 1000 classes; the teacher is randomly initialised (no weights can be
fetched: its cost per forward is the same, and its nearly flat logits make near-ties in the argmax common,
so a cached-vs-live mismatch would show there first).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import pipeline.phase1.cache_teacher as phase1
from bench.common import photo_folder_setup
from bench.phase1_speed import loader_only
from bench.phase2_speed import step_intervals
from bench.scale import make_photos
from pipeline.inspection.verify import verify
from pipeline.interrupt import RunInterrupted
from pipeline.models.build import autocast
from pipeline.models.teacher import load_teacher
from pipeline.options import CacheConfig, VerifyConfig
from pipeline.phase2.metrics import read_lines
from pipeline.phase2.train import train
from pipeline.train_options import TrainConfig

SIZES = {
    "cuda": {"teacher": "regnety_160", "student": "deit_small_distilled_patch16_224", "kwargs": {}},
    "cpu": {
        "teacher": "regnety_002",
        "student": "deit_tiny_distilled_patch16_224",
        "kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2},
    },
}
MODES: dict[str, dict[str, str]] = {"cached": {}, "none": {"distillation": "none"}, "live": {"teacher_mode": "live"}}
WARM_STEPS = 2  # steps left out of a student's steady rate: the loader's start, compilation, first allocations
VERIFY_SAMPLES = 32  # verify-cache decodes a whole shard for each (sample, view) it picks: in one process


@dataclass
class Bench:
    """What every measurement shares: the settings, the device, and the data made once for all of them."""

    args: argparse.Namespace
    folder: Path
    shards: str = ""
    check_shards: list[str] = dataclasses.field(default_factory=list)  # the bitwise checks' first few shards
    checkpoint: str = ""

    @property
    def device(self) -> torch.device:
        return torch.device(self.args.device)

    @property
    def size(self) -> dict[str, Any]:
        return SIZES[self.args.device]

    @property
    def cache(self) -> str:
        return str(self.folder / "cache.zarr")

    @property
    def check_cache(self) -> str:
        return str(self.folder / "cache-deterministic.zarr")


@contextlib.contextmanager
def gpu_peak(device: torch.device) -> Iterator[dict[str, Any]]:
    """Yields a dict that gets ``peak_gpu_mib``: the most memory allocated on the device inside the block."""
    out: dict[str, Any] = {}
    if device.type == "cuda":
        gc.collect()  # the previous measurement's models and batches: not this one's peak
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    yield out
    if device.type == "cuda":
        torch.cuda.synchronize()
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)


@contextlib.contextmanager
def deterministic(warn_only: bool = False) -> Iterator[None]:
    """Deterministic kernels inside the block only: ``train(deterministic=True)`` leaves them on for the process,
    and the speed runs after a bitwise check must run what users run."""
    try:
        torch.use_deterministic_algorithms(True, warn_only=warn_only)
        yield
    finally:
        torch.use_deterministic_algorithms(False)


def make_data(b: Bench) -> dict[str, Any]:
    """The synthetic photos packed into shards, and the random-init teacher's checkpoint (seed 0)."""
    a = b.args
    mean_bytes = make_photos(b.folder / "photos", a.images, jobs=min(16, os.cpu_count() or 1))
    meta, b.shards, b.checkpoint = photo_folder_setup(b.folder, a.per_shard, b.size["teacher"], b.folder / "photos")
    b.check_shards = [str(b.folder / "data" / s["name"]) for s in meta["shards"][: a.check_shards]]
    return {"images": meta["num_samples"], "shards": len(meta["shards"]), "mean_jpeg_bytes": round(mean_bytes)}


def teacher_forward(b: Bench) -> dict[str, Any]:
    """The teacher alone, as cache-teacher runs it (bf16 autocast and channels_last on CUDA, uint8 pixels
    widened on the device), on a batch already on the device: the bound phase 1 is measured against."""
    a, device = b.args, b.device
    with gpu_peak(device) as mem:
        model, _ = load_teacher(b.size["teacher"], 1000, b.checkpoint, device)
        x = torch.randint(0, 256, (a.batch_size, 3, a.img_size, a.img_size), dtype=torch.uint8, device=device)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(device):
            for _ in range(3):  # cuDNN's algorithm choice and the allocator's first blocks
                model(x)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(a.forward_batches):
                model(x)
            _sync(device)
            dt = time.perf_counter() - t0
    return {"img_per_s": a.forward_batches * a.batch_size / dt, "batches": a.forward_batches, **mem}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _cache_config(b: Bench, shards: list[str], out: str, **kw: Any) -> CacheConfig:
    a = b.args
    return CacheConfig(
        shards=shards, out=out, teacher=b.size["teacher"], teacher_checkpoint=b.checkpoint, num_classes=1000,
        img_size=a.img_size, views=a.views, view_block=a.view_block, topk=10, batch_size=a.batch_size,
        device=a.device, workers=a.workers, progress="off", **kw,
    )  # fmt: skip


@contextlib.contextmanager
def batch_clock() -> Iterator[list[tuple[float, int]]]:
    """(time, views) of every teacher batch cache-teacher launches inside the block: its steady rate, from the
    first batch to the last, leaves out the start-up (teacher build, checkpoint digest, workers' first unit)."""
    stamps: list[tuple[float, int]] = []
    launch = phase1._teacher_batch

    def timed(job: Any, unit: Any, item: dict[str, Any]) -> Any:
        stamps.append((time.perf_counter(), len(item["keys"])))
        return launch(job, unit, item)

    phase1._teacher_batch = timed
    try:
        yield stamps
    finally:
        phase1._teacher_batch = launch


def cache_teacher(b: Bench) -> dict[str, Any]:
    """``cache-teacher`` over every view with the machine's loader workers: images x views per second."""
    with gpu_peak(b.device) as mem, batch_clock() as stamps:
        t0 = time.perf_counter()
        summary = phase1.run(_cache_config(b, [b.shards], b.cache))
        wall = time.perf_counter() - t0
    steady = None
    if len(stamps) > 1:
        steady = sum(n for _, n in stamps[:-1]) / max(stamps[-1][0] - stamps[0][0], 1e-9)
    return {
        "views": summary["views"],
        "img_views_per_s": steady,
        "whole_run_img_views_per_s": summary["views"] / wall,
        "startup_s": round(stamps[0][0] - t0, 2) if stamps else None,
        "workers": b.args.workers,
        **mem,
    }


def verify_cache(b: Bench) -> dict[str, Any]:
    """``verify-cache`` on the device: checksums, keys, replayed-pixel digests, the live teacher on random views."""
    cfg = VerifyConfig(cache=b.cache, shards=[b.shards], teacher_checkpoint=b.checkpoint, device=b.args.device)
    report = verify(dataclasses.replace(cfg, samples=VERIFY_SAMPLES))
    keep = ("top1_agreement", "topk_overlap", "max_abs_value_diff", "pixels_checked", "pixel_mismatches")
    return {"ok": report["ok"], "problems": report["problems"][:3], **{k: report[k] for k in keep}}


def loader_alone(b: Bench, workers: int) -> dict[str, Any]:
    """Phase 1's data path alone (decode, replay, batch; no teacher) with ``workers`` workers, for
    ``--loader-seconds`` after its first batch: how the loader scales with the cores it is given. Twice the
    cache's views, so that the most workers do not run out of units within that time."""
    a = b.args
    ns = argparse.Namespace(views=2 * a.views, img_size=a.img_size, topk=10, batch_size=a.batch_size, workers=workers)
    r = loader_only(b.shards, ns, a.view_block, seconds=a.loader_seconds)
    rate = r["images_views_per_s"]
    return {**r, "img_views_per_s": rate, "per_worker": rate / max(r["workers"], 1)}


def _train_config(b: Bench, shards: list[str], cache: str, out: Path, steps: int, **kw: Any) -> TrainConfig:
    """One epoch of at most ``steps`` steps unless ``kw`` says otherwise; a metrics line each step (its time).

    The shuffle window is four batches, not 2048 views: the check's epochs are a few thousand views, and a
    window that holds most of one would be filled before the first step, hiding the loader's rate.
    """
    a = b.args
    return TrainConfig(**{
        "shards": shards, "cache": [cache], "out": str(out), "model": b.size["student"], "img_size": a.img_size,
        "shuffle_buffer": 4 * a.batch_size, "teacher_checkpoint": [b.checkpoint],
        "model_kwargs": {"img_size": a.img_size, **b.size["kwargs"]},
        "epochs": 1, "batch_size": a.batch_size, "max_steps_per_epoch": steps, "warmup_epochs": 0, "eval_every": 0,
        "log_every": 1, "device": a.device, "workers": a.workers, "progress": "off", **kw,
    })  # fmt: skip


def student(b: Bench, mode: str, compile: bool) -> dict[str, Any]:
    """Student training images per second with a cached, live or no teacher (``--compile`` or not), as users
    run it (no deterministic kernels). Steady rate: the steps after the first ``WARM_STEPS``."""
    out = b.folder / "runs" / f"{mode}{'-compile' if compile else ''}"
    cfg = _train_config(b, [b.shards], b.cache, out, b.args.steps, compile=compile, **MODES[mode])
    with gpu_peak(b.device) as mem:
        result = train(cfg)
    events = read_lines(str(out / "metrics.jsonl"))
    steady = step_intervals(events)[WARM_STEPS:]
    start = next(e["time"] for e in events if e["event"] == "start")
    first = next((e["time"] for e in events if e["event"] == "train"), None)
    return {
        "img_per_s": len(steady) * cfg.batch_size / sum(steady) if steady else None,
        "epoch_img_per_s": result["img_per_s"],
        "steps": result["steps"],
        "first_step_s": round(first - start, 2) if first is not None else None,
        **mem,
    }


def check_cache(b: Bench) -> dict[str, Any]:
    """The first view block of the first ``--check-shards`` shards cached again with deterministic kernels: what
    the bitwise checks train from (the speed runs' cache was made as users make one, and CUDA may pick other
    kernels for it). An operation with no
    deterministic CUDA kernel only warns here: the bitwise checks then show whether it mattered."""
    with deterministic(warn_only=True):
        summary = phase1.run(_cache_config(b, b.check_shards, b.check_cache, view_range=f"0:{b.args.view_block}"))
    return {"views": summary["views"]}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pth", weights_only=True, map_location="cpu")["model"]


def _compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, Any]:
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    worst = max((float((a[k].float() - b[k].float()).abs().max()) for k in differ), default=0.0)
    return {"ok": not differ, "tensors": len(a), "tensors_differing": len(differ), "max_abs_diff": worst}


def cached_equals_live(b: Bench) -> dict[str, Any]:
    """Hard distillation from the cache and from the live teacher, deterministic kernels: the same weights?"""
    folder = b.folder / "bitwise"
    for mode in ("cached", "live"):
        with deterministic():
            cfg = _train_config(b, b.check_shards, b.check_cache, folder / mode, b.args.check_steps, **MODES[mode])
            train(dataclasses.replace(cfg, deterministic=True))
    return _compare(_weights(folder / "cached"), _weights(folder / "live"))


def resume(b: Bench) -> dict[str, Any]:
    """A run stopped mid-epoch (as a preemption would stop it) and resumed == the uninterrupted run, bit for bit."""
    folder, steps = b.folder / "resume", b.args.check_steps
    stop_at = steps + max(steps // 2, 1)  # global step: the middle of the second epoch
    whole = _train_config(b, b.check_shards, b.check_cache, folder / "whole", steps, epochs=2, deterministic=True)
    parts = dataclasses.replace(whole, out=str(folder / "parts"))
    with deterministic():
        train(whole)
        os.environ["STILLROOM_DEBUG_STOP_AT_STEP"] = str(stop_at)
        try:
            train(parts)
            raise RuntimeError(f"the run was not stopped at global step {stop_at}")
        except RunInterrupted:
            pass  # the stop asked for
        finally:
            del os.environ["STILLROOM_DEBUG_STOP_AT_STEP"]
        train(dataclasses.replace(parts, resume=True))
    return {**_compare(_weights(folder / "whole"), _weights(folder / "parts")), "stopped_at_step": stop_at}
