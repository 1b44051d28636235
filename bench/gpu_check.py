"""One command for the day a GPU is lent: do the CUDA paths work, and how fast is each phase?

Checks (pass / fail, each with what it measured):

* phase 1 on the device: cache-teacher runs (bf16 autocast, channels_last, pinned asynchronous copies,
  CUDA events) and its cache verifies (`verify-cache`: checksums, keys, replayed-pixel digests, the live
  teacher on random views);
* phase 2 on the device: cached and live hard distillation with deterministic kernels train the same
  weights, bit for bit (and if not, how often the live teacher's argmax differs from the cached one);
* resume on the device: a run stopped mid-epoch and resumed equals the uninterrupted run, bit for bit.

Ratios (the headline figures of the README), measured side by side in this run:

* phase 1: cache-teacher's images x views per second against the bare teacher forward (bf16, batch of
  the same size, data already on the device);
* phase 2: student images per second, cached teacher vs no teacher vs live teacher.

Data: ImageNet-shaped synthetic JPEGs (500x375, ``bench/scale.py``'s generator), 1000 classes. No
pretrained weights can be fetched, so the teacher is randomly initialised (its cost per forward is the
same; its logits are nearly flat, so near-ties in the argmax are common: a cached-vs-live mismatch would
show there first). On a GPU (defaults): regnety_160 teacher, DeiT-S student, 224 px. On a CPU
(``--device cpu``, tiny sizes for a test): regnety_002 and a one-block DeiT at 32 px.

    bash bench/gpu_check.sh                       # on a GPU machine: about 5 minutes on one GPU, 16 cores
    .venv/bin/python bench/gpu_check.py --device cpu --images 48 --img-size 32 --steps 2   # a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS: before CUDA starts
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import RESULTS, write_result  # noqa: E402
from bench.report import gpu_check as render  # noqa: E402
from bench.scale import make_photos  # noqa: E402
from pipeline.inspection.verify import verify  # noqa: E402
from pipeline.models.build import autocast  # noqa: E402
from pipeline.models.teacher import load_teacher  # noqa: E402
from pipeline.options import CacheConfig, VerifyConfig  # noqa: E402
from pipeline.phase1.cache_teacher import run as cache_teacher  # noqa: E402
from pipeline.phase2.train import train  # noqa: E402
from pipeline.shards.pack import pack  # noqa: E402
from pipeline.train_options import TrainConfig  # noqa: E402

SIZES = {
    "cuda": {"teacher": "regnety_160", "student": "deit_small_distilled_patch16_224", "kwargs": {}},
    "cpu": {
        "teacher": "regnety_002",
        "student": "deit_tiny_distilled_patch16_224",
        "kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2},
    },
}


def bare_forward(teacher: str, checkpoint: str, args: argparse.Namespace) -> float:
    """Images per second of the teacher alone: bf16 (on CUDA), channels_last, data on the device."""
    device = torch.device(args.device)
    model, _ = load_teacher(teacher, 1000, checkpoint, device)
    x = torch.randint(0, 256, (args.batch_size, 3, args.img_size, args.img_size), dtype=torch.uint8, device=device)
    with torch.inference_mode(), autocast(device):
        for _ in range(2):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.forward_batches):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return args.forward_batches * args.batch_size / (time.perf_counter() - t0)


def student_runs(base: TrainConfig, teacher: str, folder: Path) -> dict[str, Any]:
    """Throughput of each mode, and whether cached and live hard distillation train the same weights."""
    out: dict[str, Any] = {}
    modes = {"cached": {}, "none": {"distillation": "none"}, "live": {"teacher_mode": "live"}}
    for name, kw in modes.items():
        cfg = dataclasses.replace(base, out=str(folder / name), **kw)
        t0 = time.perf_counter()
        result = train(cfg)
        out[name] = {"img_per_s": result["img_per_s"], "wall_s": round(time.perf_counter() - t0, 2)}
    weights = [torch.load(folder / m / "last.pth", weights_only=True)["model"] for m in ("cached", "live")]
    out["cached_equals_live"] = all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    return out


def resume_run(base: TrainConfig, folder: Path, stop_at: int) -> bool:
    """A run stopped at global step ``stop_at`` (as a preemption would) and resumed == the whole run."""
    whole = dataclasses.replace(base, out=str(folder / "whole"), epochs=2)
    train(whole)
    parts = dataclasses.replace(whole, out=str(folder / "parts"))
    os.environ["STILLROOM_DEBUG_STOP_AT_STEP"] = str(stop_at)
    try:
        train(parts)
    except Exception as e:  # RunInterrupted: the expected stop
        if type(e).__name__ != "RunInterrupted":
            raise
    finally:
        del os.environ["STILLROOM_DEBUG_STOP_AT_STEP"]
    train(dataclasses.replace(parts, resume=True))
    a, b = (torch.load(folder / r / "last.pth", weights_only=True)["model"] for r in ("whole", "parts"))
    return all(torch.equal(a[k], b[k]) for k in a)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--images", type=int, default=2048, help="synthetic ImageNet-shaped JPEGs")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=12, help="student steps per mode")
    p.add_argument("--forward-batches", type=int, default=20)
    p.add_argument("--workers", type=int, default=min(14, os.cpu_count() or 1))
    p.add_argument("--out", default=str(RESULTS / "gpu_check.json"))
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device (run with --device cpu for a smoke run)")
    size = SIZES[args.device]
    checks: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="stillroom-gpu-check-") as tmp:
        t = Path(tmp)
        make_photos(t / "photos", args.images, jobs=min(8, os.cpu_count() or 1))
        shards = str(t / "data" / pack(str(t / "photos"), str(t / "data"), per_shard=256)["train"]["pattern"])
        torch.manual_seed(0)
        import timm

        torch.save(timm.create_model(size["teacher"], num_classes=1000).state_dict(), t / "teacher.pth")
        teacher = str(t / "teacher.pth")
        cache = str(t / "cache.zarr")
        common = {"device": args.device, "workers": args.workers, "progress": "off"}
        t0 = time.perf_counter()
        summary = cache_teacher(
            CacheConfig(
                shards=[shards], out=cache, teacher=size["teacher"], teacher_checkpoint=teacher, num_classes=1000,
                img_size=args.img_size, views=args.views, view_block=args.views, topk=10,
                batch_size=args.batch_size, **common,
            )
        )  # fmt: skip
        phase1 = summary["views"] / (time.perf_counter() - t0)
        bare = bare_forward(size["teacher"], teacher, args)
        report = verify(
            VerifyConfig(cache=cache, shards=[shards], teacher_checkpoint=teacher, samples=64, device=args.device)
        )
        checks["phase1_verifies"] = {"ok": report["ok"], "problems": report["problems"][:3]}
        base = TrainConfig(
            shards=[shards], cache=[cache], out="", model=size["student"], img_size=args.img_size,
            model_kwargs={"img_size": args.img_size, **size["kwargs"]}, teacher_checkpoint=[teacher], epochs=1,
            batch_size=args.batch_size, max_steps_per_epoch=args.steps, warmup_epochs=0, eval_every=0,
            log_every=1, deterministic=True, **common,
        )  # fmt: skip
        phase2 = student_runs(base, size["teacher"], t / "runs")
        checks["cached_equals_live_bitwise"] = {"ok": phase2.pop("cached_equals_live")}
        checks["resume_bitwise"] = {"ok": resume_run(base, t / "resume", stop_at=max(args.steps // 2, 1))}
    results = {
        "checks": checks,
        "phase1": {"cache_img_views_per_s": round(phase1, 2), "bare_forward_img_per_s": round(bare, 2)},
        "phase2": phase2,
        "ratios": {
            "phase1_vs_bare_forward": round(phase1 / bare, 4),
            "cached_vs_none": round(phase2["cached"]["img_per_s"] / phase2["none"]["img_per_s"], 4),
            "cached_vs_live": round(phase2["cached"]["img_per_s"] / phase2["live"]["img_per_s"], 4),
        },
    }
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    doc = write_result(args.out, "gpu_check", results, device=device, settings=vars(args), sizes=size)
    print(json.dumps(results, indent=1))
    print("\n".join(render(doc)))
    if not all(c["ok"] for c in checks.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
