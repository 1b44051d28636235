"""The GPU check's tables, from its JSON (``bench/gpu_check.py`` prints them, ``bench/report.py`` puts them in
docs/benchmarks.md), and how to run it on the GPU machine while it has not run.

    python3 bench/gpu_report.py OUT/gpu_check.json [--md OUT/gpu_check.md]   # the tables of a (partial) run

Standard library only: ``bench/gpu_check.sh`` shows what a run cut short had measured with it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import fmt_num, md_table

MODES = ("cached", "none", "live")
LOADER_WORKERS = (1, 4, 8, 14)
COMMAND = 'PYTHON=python3 WHEELS=bench/wheels bash bench/gpu_check.sh --out "$OUT"'
CHECKS = {
    "verify_cache": "phase 1 cache verifies (verify-cache: checksums, keys, pixel digests, live teacher)",
    "cached_equals_live": "cached = live hard distillation, bit for bit (deterministic kernels)",
    "resume": "mid-epoch resume = uninterrupted run, bit for bit",
}


def ratios(runs: dict[str, Any]) -> dict[str, float | None]:
    """The headline ratios, from whichever measurements ran."""

    def rate(name: str, key: str = "img_per_s") -> float | None:
        r = runs.get(name, {})
        return r.get(key) if r.get("status") == "ok" else None

    def div(a: float | None, b: float | None) -> float | None:
        return round(a / b, 4) if a is not None and b else None

    out = {"phase1_vs_bare_forward": div(rate("cache_teacher", "img_views_per_s"), rate("teacher_forward"))}
    for suffix in ("", "_compile"):
        out[f"cached_vs_none{suffix}"] = div(rate(f"student_cached{suffix}"), rate(f"student_none{suffix}"))
        out[f"cached_vs_live{suffix}"] = div(rate(f"student_cached{suffix}"), rate(f"student_live{suffix}"))
    for mode in MODES:
        out[f"{mode}_compile_vs_eager"] = div(rate(f"student_{mode}_compile"), rate(f"student_{mode}"))
    return out


def _status(r: dict[str, Any] | None) -> str:
    if not r:
        return "not run"
    if r.get("status") == "failed":
        return "failed"
    if r.get("status") == "skipped":
        return f"skipped ({r.get('why')})"
    return ""


def _cell(r: dict[str, Any] | None, key: str, why: bool = True) -> Any:
    """``r[key]``, or why there is none (in the row's first figure; the others are left blank)."""
    if _status(r):
        return _status(r) if why else ""
    return r.get(key)  # type: ignore[union-attr]


def _checks(runs: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for name, label in CHECKS.items():
        r = runs.get(name)
        if _status(r):
            rows.append([label, _status(r), str((r or {}).get("error", "")).replace("|", "/")])
            continue
        detail = {
            "verify_cache": lambda r: "; ".join(
                [f"top-1 agreement {r.get('top1_agreement')}, max value diff {fmt_num(r.get('max_abs_value_diff'))}"]
                + [p.replace("|", "") for p in r.get("problems", [])]
            ),
            "cached_equals_live": lambda r: (
                f"{r.get('tensors_differing')} of {r.get('tensors')} tensors differ "
                f"(largest difference {fmt_num(r.get('max_abs_diff'))})"
            ),
            "resume": lambda r: (
                f"stopped at step {r.get('stopped_at_step')}; {r.get('tensors_differing')} of "
                f"{r.get('tensors')} tensors differ"
            ),
        }[name](r)
        rows.append([label, "pass" if r.get("ok") else "FAIL", detail])  # type: ignore[union-attr]
    return rows


def _phase1(runs: dict[str, Any], s: dict[str, Any]) -> str:
    bare, cache = runs.get("teacher_forward"), runs.get("cache_teacher")
    bound = None if _status(bare) else bare.get("img_per_s")  # type: ignore[union-attr]
    whole = None if _status(cache) else cache.get("whole_run_img_views_per_s")  # type: ignore[union-attr]
    rows = [
        [f"teacher forward alone (data on the device, batch {s.get('batch_size')})", _cell(bare, "img_per_s")],
        [f"cache-teacher, {s.get('workers')} loader workers, steady", _cell(cache, "img_views_per_s")],
        ["cache-teacher, whole run (start-up included)", _cell(cache, "whole_run_img_views_per_s")],
    ]
    rows[0] += [1.0 if bound else None, _cell(bare, "peak_gpu_mib", False)]
    rows[1] += [ratios(runs)["phase1_vs_bare_forward"], _cell(cache, "peak_gpu_mib", False)]
    rows[2] += [whole / bound if whole and bound else None, ""]
    return md_table(["phase 1", "img·views/s", "ratio to bare forward", "peak GPU MiB"], rows)


def _loader(runs: dict[str, Any], workers: list[int]) -> str:
    rows = []
    one = runs.get(f"loader_{workers[0]}w", {}).get("per_worker") if workers else None
    for w in workers:
        r = runs.get(f"loader_{w}w")
        per = None if _status(r) else r.get("per_worker")  # type: ignore[union-attr]
        rows.append([w, _cell(r, "img_views_per_s"), per, per / one if per and one else None])
    relative = f"per worker, relative to {workers[0] if workers else '?'} worker(s)"
    return md_table(["loader workers", "img·views/s", "per worker", relative], rows)


def _phase2(runs: dict[str, Any]) -> str:
    rows, rat = [], ratios(runs)
    for suffix, compiled in (("", "no"), ("_compile", "yes")):
        for mode in MODES:
            r = runs.get(f"student_{mode}{suffix}")
            vs_none = rat[f"cached_vs_none{suffix}"] if mode == "cached" else (1.0 if mode == "none" else None)
            rows.append([mode, compiled, _cell(r, "img_per_s"), vs_none if not _status(r) else ""])
            rows[-1] += [_cell(r, "peak_gpu_mib", False), _cell(r, "first_step_s", False)]
    headers = ["teacher", "--compile", "student img/s (steady)", "ratio to no teacher", "peak GPU MiB"]
    return md_table([*headers, "s to first step"], rows)


def _times(x: float | None) -> str:
    return "not measured" if x is None else f"{fmt_num(x)}x"


def report_lines(doc: dict[str, Any]) -> list[str]:
    """The markdown of one run (complete or not)."""
    r, s, sizes, gpu = doc["results"], doc.get("settings", {}), doc.get("sizes", {}), doc.get("gpu") or {}
    runs = r.get("runs", {})
    state = "complete" if r.get("complete") else f"NOT complete: stopped or cut short after {r.get('elapsed_s')} s"
    device = gpu.get("name") or "cpu"
    if gpu.get("memory_gib"):
        device += f" ({gpu['memory_gib']} GiB, CUDA {gpu.get('cuda')}, cuDNN {gpu.get('cudnn')})"
    failed = [f"- {name}: {x.get('error')}" for name, x in runs.items() if x.get("status") == "failed"]
    out = [
        f"Device: {device}; teacher `{sizes.get('teacher')}` (random weights), student `{sizes.get('student')}`, "
        f"{s.get('img_size')} px, batch {s.get('batch_size')}, {s.get('images')} synthetic 500x375 JPEGs, "
        f"V = {s.get('views')} (blocks of {s.get('view_block')}), {s.get('workers')} loader workers; bf16 autocast "
        f"and channels_last on CUDA. Run {state}.",
        "",
        md_table(["check", "result", "detail"], _checks(runs)),
        "",
        _phase1(runs, s),
        "",
        "Phase 1's loader alone (decode + replay + batch, no teacher), timed after its first batch:",
        "",
        _loader(runs, list(s.get("loader_workers") or [])),
        "",
        _phase2(runs),
        "",
        "`--compile` over eager, steady student img/s: "
        + ", ".join(f"{m} {_times(ratios(runs)[f'{m}_compile_vs_eager'])}" for m in MODES)
        + f"; cached over live teacher: {_times(ratios(runs)['cached_vs_live'])} eager, "
        + f"{_times(ratios(runs)['cached_vs_live_compile'])} compiled.",
    ]
    if failed:
        out += ["", "Failed:", "", *failed]
    return out


def how_to_run() -> list[str]:
    """What docs/benchmarks.md says while no GPU has run the check: how to run it, and that nothing is measured."""
    figures = [
        ["phase 1: cache-teacher img·views/s against the bare teacher forward (regnety_160, bf16, channels_last)"],
        ["phase 1: the loader alone at 1, 4, 8 and 14 workers (img·views/s per core)"],
        ["phase 2: DeiT-S img/s with a cached, live or no teacher, with and without --compile"],
        ["peak GPU memory of each run"],
        ["cached = live, bit for bit, with deterministic kernels; mid-epoch resume, bit for bit"],
    ]
    return [
        "Not measured: no GPU has been lent to this project yet, so every figure below is missing, not guessed.",
        "",
        md_table(["figure", "value"], [[f[0], "not measured"] for f in figures]),
        "",
        "How to run it on the GPU machine (one H100 or H200 with 16 cores; `python3` with torch, torchvision, timm, "
        "numpy, pillow and the rest of the usual stack, but no zarr, numcodecs or webdataset, and no network), "
        "in one command sized to finish in under 8 minutes there (not yet timed on a GPU). The check calls no "
        "torch API newer than the project's floor (torch 2.4), so that machine's torch 2.11 runs it; the JSON "
        "records every version it ran with.",
        "",
        "1. Here, where the package registries are reachable and `.venv` exists (`scripts/setup.sh`): "
        "`bash bench/gpu_wheels.sh bench/wheels`. It downloads the wheels of what the check needs that the machine "
        "lacks (zarr, numcodecs, webdataset, braceexpand, donfig, google-crc32c), pinned to the versions in "
        "`.venv` (`bench/gpu_deps.py` reads them), for CPython 3.12 on manylinux x86-64: 9.3 MiB when this was "
        "written, with a `requirements.txt` of the pins. `bench/wheels/` is git-ignored.",
        "2. Send the working tree with `bench/wheels/` (on the lent device: carry `bench/wheels`; the tree and the "
        "wheels together are about 11 MiB of the 64 MiB that may travel) and run, in the repository root:",
        "",
        f"       {COMMAND}",
        "",
        "   It installs the wheels into a temporary folder with `pip install --no-index --no-deps --target` on top "
        "of the machine's own torch and timm (nothing is fetched; `scripts/setup.sh` never runs), puts the "
        "repository on `PYTHONPATH` and runs `bench/gpu_check.py`. A package still missing is one `error:` line "
        "that names it. Each measurement is guarded: one that fails (e.g. `torch.compile`) is recorded and the "
        "rest still run; none starts after `--budget-s` (420 s) and the whole is stopped at `--limit-s` (570 s).",
        "3. Results land in `$OUT` (`--out`): `gpu_check.json`, rewritten after every measurement so that a run "
        "cut short still returns what it measured, `gpu_check.md` (the tables), `gpu_check.log` (all output) and "
        "`nvidia-smi.txt`. Copy `gpu_check.json` into `bench/results/` and run `.venv/bin/python bench/report.py` "
        "to put its tables here.",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description="print the tables of a GPU check's JSON (complete or not)")
    p.add_argument("json", type=Path)
    p.add_argument("--md", type=Path, default=None, help="also write them to this file")
    args = p.parse_args()
    text = "\n".join(report_lines(json.loads(args.json.read_text()))) + "\n"
    print(text, end="")
    if args.md:
        args.md.write_text(text)


if __name__ == "__main__":
    main()
