"""The GPU check is ready for a machine with no network: its offline install, its smoke run, its failures.

The GPU machine has torch, timm and the usual stack but not zarr, numcodecs or webdataset, and reaches no
package index. The offline test builds a stand-in: a venv that sees only that stack (symbolic links to this
venv's copies, no reinstall), the rest installed by ``bench/gpu_check.sh`` from a folder that
``bench/gpu_wheels.sh`` filled, then the check's CPU smoke run to its end.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, child_env

from bench.gpu_deps import CHECK_NEEDS, MACHINE_HAS, closure

PYV = f"{sys.version_info.major}.{sys.version_info.minor}"


def _gpu_check(*args: str, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "bench/gpu_check.sh", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=child_env(**env),
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What gpu_wheels.sh downloads for this interpreter, once per session; skips if no index answers."""
    folder = tmp_path_factory.mktemp("wheels")
    cmd = ["bash", "bench/gpu_wheels.sh", str(folder), "--python-version", PYV]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=child_env(PYTHON=sys.executable))
    if proc.returncode:
        probe = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(folder / "probe"), "braceexpand"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if probe.returncode:
            pytest.skip(f"the package index is unreachable (pip download braceexpand failed): {probe.stderr[-300:]}")
        pytest.fail(f"gpu_wheels.sh failed with the index reachable:\n{proc.stderr[-3000:]}")
    return folder


def machine_venv(root: Path) -> Path:
    """A venv that sees what the GPU machine has (its packages and their own dependencies, and pip) and
    nothing else: each one's top-level files linked from this venv's site-packages. Returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    site = next((root / "lib").glob("python*/site-packages"))
    for name in closure([*MACHINE_HAS, "pip"]):
        dist = md.distribution(name)
        for top in {Path(str(f)).parts[0] for f in dist.files or []}:
            src, dst = Path(str(dist.locate_file(top))), site / top
            if top not in ("..", "__pycache__") and src.exists() and not dst.exists():
                dst.symlink_to(src)
    return root / "bin" / "python"


@pytest.mark.slow
def test_the_gpu_check_runs_offline_from_wheels(wheels: Path, tmp_path: Path) -> None:
    """On a Python without zarr, numcodecs and webdataset, gpu_check.sh installs them from the wheels folder
    alone and the smoke run passes every check, with the repository on PYTHONPATH (nothing installed)."""
    python = machine_venv(tmp_path / "machine")
    for module in CHECK_NEEDS:  # the stand-in lacks what the GPU machine lacks, or this test proves nothing
        lacks = subprocess.run(
            [str(python), "-c", f"import {module}"], capture_output=True, env=child_env(PYTHONPATH="")
        )
        assert lacks.returncode, f"the stand-in machine can import {module}"
    out = tmp_path / "out"
    # No index can be reached from here: a download would fail instead of passing unnoticed.
    offline = {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_FIND_LINKS": "", "PIP_NO_INDEX": "1"}
    proc = _gpu_check("--smoke", "--out", str(out), PYTHON=str(python), WHEELS=str(wheels), PYTHONPATH="", **offline)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"installed {len((wheels / 'requirements.txt').read_text().split())} packages" in proc.stdout
    doc = json.loads((out / "gpu_check.json").read_text())
    runs = doc["results"]["runs"]
    assert doc["results"]["complete"] and not [n for n, r in runs.items() if r["status"] == "failed"], runs
    ran = {n for n, r in runs.items() if r["status"] == "ok"}
    assert {"teacher_forward", "cache_teacher", "student_cached", "student_none", "student_live"} <= ran
    assert all(runs[c]["ok"] for c in ("verify_cache", "cached_equals_live", "resume")), runs
    assert runs["cache_teacher"]["img_views_per_s"] > 0 and runs["loader_2w"]["per_worker"] > 0
    assert doc["machine"]["zarr"] == md.version("zarr")  # the pinned wheel, imported from the target folder
    assert "| mid-epoch resume = uninterrupted run, bit for bit | pass |" in (out / "gpu_check.md").read_text()
    assert (out / "gpu_check.md").read_text() in proc.stdout and (out / "gpu_check.log").stat().st_size


@pytest.mark.slow
def test_a_check_cut_short_returns_what_it_measured(tmp_path: Path) -> None:
    """Stopped by --limit-s (here at the latest in an endless bare forward), the check leaves its JSON with every
    measurement it reported finished, and shows them. How far it got depends on the machine's load: the
    test holds whatever that is (on a busy machine the imports alone may take the whole limit)."""
    out = tmp_path / "out"
    endless = ("--forward-batches", "100000000")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    limit = ("--limit-s", "10")
    proc = _gpu_check(
        "--smoke", *endless, "--out", str(out), *limit, PYTHON=sys.executable, TMPDIR=str(tmp), timeout=120
    )
    assert not list(tmp.iterdir())  # its data removed, though the check itself was killed
    assert proc.returncode == 137, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ran past --limit-s 10 s" in proc.stderr
    finished = re.findall(r"\] (\w+): ok", proc.stdout)
    assert "teacher_forward" not in finished
    if "results in" not in proc.stdout:  # stopped before its first save
        assert not (out / "gpu_check.json").exists() and not finished
        return
    results = json.loads((out / "gpu_check.json").read_text())["results"]
    assert not results["complete"]
    assert [n for n, r in results["runs"].items() if r["status"] == "ok"] == finished
    assert "NOT complete" in (out / "gpu_check.md").read_text() and "| check | result | detail |" in proc.stdout


def _error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    return [line for line in proc.stderr.splitlines() if line.strip()]


def test_a_missing_wheel_is_one_line_naming_it(tmp_path: Path) -> None:
    folder = tmp_path / "wheels"
    folder.mkdir()
    (folder / "requirements.txt").write_text("zarr==3.1.6\n")
    lines = _error_lines(_gpu_check("--smoke", "--out", str(tmp_path), PYTHON=sys.executable, WHEELS=str(folder)))
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    assert "zarr==3.1.6" in lines[0] and "bench/gpu_wheels.sh" in lines[0]
    (folder / "zarr-3.1.6-cp39-cp39-manylinux2014_x86_64.whl").write_bytes(b"")  # another Python's
    lines = _error_lines(_gpu_check("--smoke", "--out", str(tmp_path), PYTHON=sys.executable, WHEELS=str(folder)))
    assert len(lines) == 1 and "not for this Python" in lines[0] and f"--python-version {PYV}" in lines[0], lines
    gone = tmp_path / "nowhere"
    lines = _error_lines(_gpu_check("--smoke", "--out", str(tmp_path), PYTHON=sys.executable, WHEELS=str(gone)))
    assert len(lines) == 1 and str(gone) in lines[0] and "gpu_wheels.sh" in lines[0], lines


def test_a_missing_module_is_one_line_naming_it(tmp_path: Path) -> None:
    """A Python that lacks a package the check imports (here zarr, hidden) gets one line, not a traceback."""
    hide = "import runpy, sys; sys.modules['zarr'] = None; sys.argv = sys.argv[1:]; "
    hide += "runpy.run_path(sys.argv[0], run_name='__main__')"
    cmd = [sys.executable, "-c", hide, "bench/gpu_check.py", "--smoke", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=child_env(), timeout=300)
    lines = _error_lines(proc)
    assert len(lines) == 1 and lines[0].startswith("error:") and "'zarr'" in lines[0], lines
    assert "gpu_wheels.sh" in lines[0] and not (tmp_path / "gpu_check.json").exists()


def test_a_failed_measurement_is_recorded_and_the_rest_run(tmp_path: Path) -> None:
    """One measurement's failure (say torch.compile's) is written down; what needs it is skipped, the rest run."""
    from bench.gpu_check import Recorder, parse_args

    rec = Recorder(parse_args(["--smoke", "--out", str(tmp_path)]), {})
    rec.run("compiled", lambda: {"x": 1 / 0}, {"phase2"})
    rec.run("after_it", lambda: {"x": 2}, {"phase2"}, needs=("compiled",))
    rec.run("other", lambda: {"ok": True, "x": 3})
    runs = json.loads((tmp_path / "gpu_check.json").read_text())["results"]["runs"]
    assert runs["compiled"]["status"] == "failed" and "ZeroDivisionError" in runs["compiled"]["error"]
    assert runs["after_it"]["status"] == "skipped" and "x" not in runs["after_it"]
    assert runs["after_it"]["why"] == "needs compiled, which did not run to the end"
    assert runs["other"]["status"] == "ok" and runs["other"]["x"] == 3
    assert rec.failures() == ["compiled"]
    rec.args.budget_s = 0
    rec.run("late", lambda: {"x": 4})
    assert rec.runs["late"]["why"].startswith("the time budget")
