"""One command for the day a GPU is lent: do the CUDA paths work, and how fast is each phase?

Measured side by side in one run (``bench/gpu_runs.py`` has one function for each):

* phase 1: the teacher's bare forward (regnety_160, bf16 autocast, channels_last, data on the device) against
  ``cache-teacher`` images x views per second with the machine's loader workers, and ``verify-cache`` on the
  device (checksums, keys, replayed-pixel digests, the live teacher on random views);
* phase 1's loader alone at 1, 4, 8 and 14 workers: how it scales per core (how many cores a GPU needs);
* phase 2: DeiT-S images per second with a cached, no and a live teacher, with and without ``--compile``;
* the peak GPU memory of each;
* cached and live hard distillation train the same weights bit for bit with deterministic kernels, and a run
  stopped mid-epoch and resumed equals the uninterrupted run bit for bit.

Each measurement is guarded: one that fails is recorded with its error and the rest still run; none starts
once ``--budget-s`` is spent. ``OUT/gpu_check.json`` is rewritten after every measurement, so a run cut short
still leaves what it measured; the tables are printed and written to ``OUT/gpu_check.md`` at the end.
Default sizes fit one H100 with 16 cores in well under 8 minutes; ``--smoke`` runs every step at toy size
on a CPU (the tests do this).

    bash bench/gpu_check.sh --help                 # how to run it offline on the GPU machine (WHEELS, --out)
    .venv/bin/python bench/gpu_check.py --smoke --out /tmp/gpu-check
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS: before CUDA starts
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, write_result  # noqa: E402
from bench.gpu_report import ratios, report_lines  # noqa: E402

FIX = (
    "make the missing wheels with `bash bench/gpu_wheels.sh bench/wheels` where the package registries are "
    "reachable, carry bench/wheels here and run `WHEELS=bench/wheels bash bench/gpu_check.sh`"
)
GPU = {
    "device": "cuda", "images": 4096, "per_shard": 32, "img_size": 224, "views": 8, "view_block": 8,
    "batch_size": 128, "steps": 32, "check_shards": 16, "check_steps": 4, "forward_batches": 30,
    "workers": min(14, os.cpu_count() or 1), "loader_workers": [1, 4, 8, 14], "loader_seconds": 6.0,
    "budget_s": 420.0, "skip": [],
}  # fmt: skip
SMOKE = {
    "device": "cpu", "images": 32, "per_shard": 16, "img_size": 32, "views": 2, "view_block": 2,
    "batch_size": 8, "steps": 4, "check_shards": 1, "check_steps": 2, "forward_batches": 2,
    "workers": 0, "loader_workers": [0, 2], "loader_seconds": 0.5,
    "budget_s": 600.0, "skip": ["compile"],
}  # fmt: skip


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    sizes = "\n".join(f"  {k}: {GPU[k]} (--smoke: {SMOKE[k]})" for k in GPU)
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawTextHelpFormatter,
        epilog=f"defaults (sized for one H100 with 16 cores):\n{sizes}",
    )
    p.add_argument("--smoke", action="store_true", help="every step at toy size on a CPU (the tests run this)")
    p.add_argument("--out", default=None, help="folder for gpu_check.json and gpu_check.md (default: bench/results)")
    p.add_argument("--device", choices=("cuda", "cpu"))
    p.add_argument("--images", type=int, help="synthetic ImageNet-shaped JPEGs (500x375, 1000 classes)")
    p.add_argument("--per-shard", type=int, help="samples per shard (a unit of phase 1 is one shard x one block)")
    p.add_argument("--img-size", type=int, help="view size in pixels")
    p.add_argument("--views", type=int, help="views per sample in the cache")
    p.add_argument("--view-block", type=int, help="views per unit (each image decoded once per unit)")
    p.add_argument("--batch-size", type=int, help="teacher and student batch size")
    p.add_argument("--steps", type=int, help="student steps per speed run")
    p.add_argument("--check-shards", type=int, help="shards the bitwise checks train on (the first ones)")
    p.add_argument("--check-steps", type=int, help="steps per epoch of the bitwise checks (at most)")
    p.add_argument("--forward-batches", type=int, help="batches timed in the bare teacher forward")
    p.add_argument("--workers", type=int, help="loader workers of cache-teacher and of the student runs")
    p.add_argument("--loader-workers", type=_ints, help="worker counts of the loader-alone runs (comma-separated)")
    p.add_argument("--loader-seconds", type=float, help="seconds each loader-alone run is timed")
    p.add_argument("--budget-s", type=float, help="no measurement starts after this many seconds")
    p.add_argument(
        "--skip",
        type=_names,
        help="measurements or groups to leave out, comma-separated:\n"
        "phase1, loader, phase2, compile, checks, or a measurement's name",
    )
    first = p.parse_args(argv)
    p.set_defaults(**(SMOKE if first.smoke else GPU))
    args = p.parse_args(argv)
    args.out = args.out or str(RESULTS)
    return args


class Recorder:
    """Runs each measurement guarded, and rewrites the JSON after each one."""

    def __init__(self, args: argparse.Namespace, extra: dict[str, Any]):
        self.args, self.extra = args, extra
        self.path = Path(args.out) / "gpu_check.json"
        self.t0 = time.perf_counter()
        self.runs: dict[str, dict[str, Any]] = {}

    def elapsed(self) -> float:
        return round(time.perf_counter() - self.t0, 1)

    def _why_not(self, name: str, tags: set[str], needs: tuple[str, ...]) -> str | None:
        if {name, *tags} & set(self.args.skip):
            return "--skip"
        for need in needs:
            if self.runs.get(need, {}).get("status") != "ok":
                return f"needs {need}, which did not run to the end"
        if self.elapsed() >= self.args.budget_s:
            return f"the time budget of {self.args.budget_s:.0f} s was spent"
        return None

    def run(
        self, name: str, fn: Callable[[], dict[str, Any]], tags: set[str] | None = None, needs: tuple[str, ...] = ()
    ) -> None:
        """Run ``fn`` unless skipped; record its result, or its error, and save."""
        why = self._why_not(name, tags or set(), needs)
        t = time.perf_counter()
        if why:
            entry: dict[str, Any] = {"status": "skipped", "why": why}
        else:
            print(f"[{self.elapsed():6.1f} s] {name} ...", flush=True)
            try:
                entry = {"status": "ok", **fn()}
            except Exception as e:  # a failed measurement is a result: record it, run the rest
                first = (str(e).strip().splitlines() or [""])[0][:500]
                entry = {"status": "failed", "error": f"{type(e).__name__}: {first}"}
                entry["traceback"] = traceback.format_exc().splitlines()[-12:]
                _free_device()
        entry["wall_s"] = round(time.perf_counter() - t, 2)
        self.runs[name] = entry
        shown = entry.get("error") or entry.get("why") or ""
        print(f"[{self.elapsed():6.1f} s] {name}: {entry['status']} {shown}".rstrip(), flush=True)
        self.save(complete=False)

    def save(self, complete: bool) -> dict[str, Any]:
        results = {"complete": complete, "elapsed_s": self.elapsed(), "runs": self.runs, "ratios": ratios(self.runs)}
        return write_result(self.path, "gpu_check", results, settings=vars(self.args), **self.extra)

    def failures(self) -> list[str]:
        """Measurements that failed, and checks that did not pass."""
        bad = [n for n, r in self.runs.items() if r["status"] == "failed"]
        return bad + [n for n, r in self.runs.items() if r["status"] == "ok" and r.get("ok") is False]


def _free_device() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _load_runs() -> Any:
    """``bench.gpu_runs`` (torch, timm, zarr... and the project), or one line naming the module missing."""
    try:
        from bench import gpu_runs
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in ("bench", "pipeline"):
            raise
        sys.exit(f"error: the GPU check needs the Python module {e.name!r}, which {sys.executable} lacks: {FIX}")
    except ImportError as e:  # a package too old or too new for the project (pyproject.toml has the bounds)
        sys.exit(f"error: {sys.executable} cannot import what the GPU check needs: {e} (see pyproject.toml's bounds)")
    return gpu_runs


def _gpu() -> dict[str, Any] | None:
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "capability": f"{props.major}.{props.minor}",
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "torch": torch.__version__,
    }


def measure(rec: Recorder, runs: Any, b: Any) -> None:
    """Every measurement, the most wanted first: what the time budget cuts is the end of this list."""
    args = b.args
    rec.run("data", lambda: runs.make_data(b))
    data = ("data",)
    rec.run("teacher_forward", lambda: runs.teacher_forward(b), {"phase1"}, data)
    rec.run("cache_teacher", lambda: runs.cache_teacher(b), {"phase1"}, data)
    rec.run("verify_cache", lambda: runs.verify_cache(b), {"phase1", "checks"}, ("cache_teacher",))
    for mode in runs.MODES:
        rec.run(f"student_{mode}", lambda m=mode: runs.student(b, m, False), {"phase2"}, ("cache_teacher",))
    rec.run("check_cache", lambda: runs.check_cache(b), {"checks"}, data)
    rec.run("cached_equals_live", lambda: runs.cached_equals_live(b), {"checks"}, ("check_cache",))
    rec.run("resume", lambda: runs.resume(b), {"checks"}, ("check_cache",))
    for w in args.loader_workers:
        rec.run(f"loader_{w}w", lambda w=w: runs.loader_alone(b, w), {"loader", "phase1"}, data)
    for mode in runs.MODES:
        tags = {"phase2", "compile"}
        rec.run(f"student_{mode}_compile", lambda m=mode: runs.student(b, m, True), tags, ("cache_teacher",))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    runs = _load_runs()
    import tempfile

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda: torch sees no CUDA device (--smoke runs every step on a CPU)")
    rec = Recorder(args, {"sizes": runs.SIZES[args.device], "gpu": _gpu(), "device": args.device})
    m = rec.save(complete=False)["machine"]  # the machine and the settings, whatever happens next
    versions = ", ".join(f"{k} {m.get(k)}" for k in ("python", "torch", "torchvision", "timm", "numpy", "zarr"))
    print(f"GPU check on {(rec.extra['gpu'] or {}).get('name', 'cpu')}: {versions}", flush=True)
    print(f"results in {rec.path} (rewritten after every measurement)", flush=True)
    with tempfile.TemporaryDirectory(prefix="stillroom-gpu-check-") as tmp:
        measure(rec, runs, runs.Bench(args, Path(tmp)))
    doc = rec.save(complete=True)
    text = "\n".join(report_lines(doc)) + "\n"
    (Path(args.out) / "gpu_check.md").write_text(text)
    print("\n" + text, end="")
    bad = rec.failures()
    if bad:
        sys.exit(f"error: {len(bad)} measurement(s) failed or did not pass: {', '.join(bad)} (see {rec.path})")


if __name__ == "__main__":
    main()
