"""The benchmark scripts still run against the library, at toy size, and the report reads what they write.

Benchmarks are run by hand (they take minutes to hours); without this test an API change breaks
them silently until the next measurement. Sizes here are the smallest each script accepts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, child_env
from photos import write_synset_folder

pytestmark = pytest.mark.slow

RUNS = {
    "phase1": ["bench/phase1_speed.py", "--img-size", "32", "--views", "2", "--bare-views", "64", "--repeats", "1"],
    "phase2": ["bench/phase2_speed.py", "--img-size", "32", "--steps", "2", "--rounds", "1", "--batch-size", "8"],
    "storage_fidelity": [
        "bench/storage_fidelity.py",
        *("--teacher-epochs", "1", "--storage-k", "5", "--digits-shards", "1", "--views", "1", "--synthetic-n", "64"),
    ],
    "loader_speed": [
        "bench/loader_speed.py",
        *("--img-size", "32", "--rounds", "1", "--views", "2", "--samples", "12", "--chunk", "8", "--ipc-chunks", "1"),
    ],
}


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    write_synset_folder(root, classes=4, images=24)
    return root


def _run(args: list[str], timeout: int = 600) -> None:
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=child_env()
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


# Benchmarks that make their own data.
SYNTHETIC = {
    "resume": [
        "bench/resume_speed.py",
        *("--count", "96", "--per-shard", "48", "--batch-size", "8", "--window", "16", "--img-size", "32"),
    ],
}


def test_benchmarks_run_and_the_report_reads_them(photos: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    runs = {name: [*args, "--images", str(photos)] for name, args in RUNS.items()} | SYNTHETIC
    for name, args in runs.items():
        _run([*args, "--out", str(results / f"{name}.json")])
        doc = json.loads((results / f"{name}.json").read_text())
        assert doc["benchmark"] and doc["machine"]["torch"] and doc["results"], name
    out = tmp_path / "benchmarks.md"
    _run(["bench/report.py", "--results", str(results), "--out", str(out)])
    text = out.read_text()
    assert "could not read" not in text
    for title in ("Phase 1 speed", "Phase 2 speed", "Cache storage", "Mid-epoch resume", "Loader speed"):
        section = text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
        assert "Not run yet" not in section and "| ---" in section, title


def test_every_bench_module_imports() -> None:
    """A benchmark not run above still imports what it uses from the library (a stale import otherwise hides
    until the next measurement: two did after the layers moved)."""
    names = sorted(p.stem for p in (ROOT / "bench").glob("*.py"))
    code = f"import sys; sys.argv = ['x']; import importlib; [importlib.import_module('bench.' + n) for n in {names}]"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
