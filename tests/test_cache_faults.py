"""Phase 1 under faults and concurrency, with ``stillroom cache-teacher`` as real subprocesses.

Every scenario must end with a cache whose bytes equal one uninterrupted single-worker run:
* SIGKILL part-way (some units done, one unit half-written), then resume;
* ``--job-count 2``: two concurrent jobs over disjoint units of one cache;
* two concurrent workers doing the SAME units (a retried batch job).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import cache_cli_args, done_markers, stillroom_cmd

from pipeline.cache import ARRAYS

ROOT = Path(__file__).resolve().parents[1]
UNITS = 9  # 3 shards x 3 view blocks
# One intra-op thread per process: 2 processes on 2 cores, and no OpenMP spinning under load.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

pytestmark = pytest.mark.slow


def _args(shards: str, teacher: str, out: Path, *extra: str) -> list[str]:
    settings = cache_cli_args(shards, teacher, out, views=6, view_block=2, batch_size=8, workers=None)
    return [*stillroom_cmd(), *settings, *extra]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    f = open(log, "w")  # noqa: SIM115 (closed by _wait)
    p = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    p.log_file = f  # type: ignore[attr-defined]
    return p


def _wait(p: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    try:
        rc = p.wait(timeout=timeout)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        p.log_file.close()  # type: ignore[attr-defined]
    return rc, Path(p.log_file.name).read_text()  # type: ignore[attr-defined]


def _summary(text: str) -> tuple[int, int]:
    m = re.search(r"cache-teacher: (\d+) units done, (\d+) skipped", text)
    assert m, text
    return int(m.group(1)), int(m.group(2))


def _snapshot(out: Path) -> tuple[dict[str, np.ndarray], dict[str, bytes]]:
    """Every array through plain zarr, and every stored file's bytes (temp files excluded)."""
    g = zarr.open_group(str(out), mode="r")
    arrays = {name: np.asarray(g[name][...]) for name in ARRAYS}
    files = {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and not p.name.endswith(".partial")
    }
    return arrays, files


def _assert_same(out: Path, reference: tuple[dict[str, np.ndarray], dict[str, bytes]]) -> None:
    arrays, files = _snapshot(out)
    ref_arrays, ref_files = reference
    assert (arrays["done"][..., 0] == 40).all(), arrays["done"]
    for name in ARRAYS:
        a, b = arrays[name], ref_arrays[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if name == "keys":
            assert a.tolist() == b.tolist(), name
        else:
            assert a.tobytes() == b.tobytes(), f"{name} differs from the uninterrupted run"
    assert sorted(files) == sorted(ref_files)
    differing = [name for name in files if files[name] != ref_files[name]]
    assert not differing, f"stored objects differ from the uninterrupted run: {differing[:5]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits_shards, tiny_teacher):
    """One uninterrupted single-worker run (workers 0)."""
    out = tmp_path_factory.mktemp("reference") / "cache"
    rc, text = _wait(_start(_args(digits_shards, tiny_teacher, out, "--workers", "0"), out.parent / "log.txt"))
    assert rc == 0, text
    assert _summary(text) == (UNITS, 0)
    return _snapshot(out)


def test_sigkill_then_resume_is_byte_identical(tmp_path, reference, digits_shards, tiny_teacher):
    out = tmp_path / "cache"
    # Killed run: one loader worker process; killed (whole process group) once 2 units are marked done.
    # Same batch size as the reference: CPU kernels may round differently at another batch size.
    p = _start(_args(digits_shards, tiny_teacher, out, "--workers", "1"), tmp_path / "a.txt")
    deadline = time.monotonic() + 120
    while done_markers(out) < 2:
        assert p.poll() is None, f"finished before it could be killed:\n{Path(p.log_file.name).read_text()}"
        assert time.monotonic() < deadline, "no unit finished in 120 s"
        time.sleep(0.01)
    os.killpg(p.pid, signal.SIGKILL)
    rc, _ = _wait(p)
    assert rc == -signal.SIGKILL
    done = np.asarray(zarr.open_group(str(out), mode="r")["done"][..., 0])
    n_done = int((done >= 0).sum())
    assert 2 <= n_done < UNITS, done

    # Make one unfinished unit look half-written by a killed worker: data chunks present, no marker.
    b, s = (int(x) for x in np.argwhere(done < 0)[0])
    g = zarr.open_group(str(out), mode="r+")
    rows = slice(s * 40, (s + 1) * 40)
    g["values"][2 * b : 2 * b + 2, rows] = np.float16(7.0)
    g["indices"][2 * b : 2 * b + 2, rows] = 3
    g["logsumexp"][2 * b : 2 * b + 2, rows] = 1.0
    assert int(g["done"][b, s, 0]) == -1

    # Resume with another worker count: finished units are skipped, the rest (the half-written one too) redone.
    rc, text = _wait(_start(_args(digits_shards, tiny_teacher, out, "--workers", "0"), tmp_path / "b.txt"))
    assert rc == 0, text
    assert _summary(text) == (UNITS - n_done, n_done)
    _assert_same(out, reference)


def test_two_jobs_split_units_into_one_cache(tmp_path, reference, digits_shards, tiny_teacher):
    out = tmp_path / "cache"
    procs = [
        _start(
            _args(digits_shards, tiny_teacher, out, "--workers", "0", "--job-index", str(i), "--job-count", "2"),
            tmp_path / f"job{i}.txt",
        )
        for i in range(2)
    ]
    results = [_wait(p) for p in procs]
    for rc, text in results:
        assert rc == 0, text
    done = [_summary(text) for _, text in results]
    assert done == [(5, 0), (4, 0)], "disjoint shares covering all 9 units"
    _assert_same(out, reference)


def test_two_workers_same_units_concurrently(tmp_path, reference, digits_shards, tiny_teacher):
    out = tmp_path / "cache"
    # A retried batch job: the same job index runs twice at once (one with a loader worker, one without).
    procs = [
        _start(
            _args(digits_shards, tiny_teacher, out, "--workers", w, "--job-index", "0", "--job-count", "1"),
            tmp_path / f"w{w}.txt",
        )
        for w in ("0", "1")
    ]
    results = [_wait(p) for p in procs]
    for rc, text in results:
        assert rc == 0, text
    # Each did every unit not already done when it started; together at least all of them.
    assert sum(_summary(text)[0] for _, text in results) >= UNITS
    _assert_same(out, reference)


@pytest.mark.parametrize(
    "index_var, extra",
    [
        ("JOB_COMPLETION_INDEX", {}),
        ("AWS_BATCH_JOB_ARRAY_INDEX", {}),
        ("SLURM_ARRAY_TASK_ID", {"SLURM_ARRAY_TASK_MIN": "1"}),
    ],
)
def test_job_count_flag_takes_index_from_batch_system(index_var, extra):
    """``--job-count N`` alone (a Kubernetes pod knows only JOB_COMPLETION_INDEX; AWS Batch sets no array
    size): each job's index still comes from its environment, so the shares are disjoint and cover all."""
    from pipeline.partition import job_slot, my_share

    units = [(b, s) for b in range(3) for s in range(3)]
    base = int(extra.get("SLURM_ARRAY_TASK_MIN", "0"))
    slots = [job_slot(None, 2, env={index_var: str(base + i), **extra}) for i in range(2)]
    assert [s[:2] for s in slots] == [(0, 2), (1, 2)]
    shares = [my_share(units, i, n) for i, n, _ in slots]
    assert sorted(shares[0] + shares[1]) == sorted(units)
