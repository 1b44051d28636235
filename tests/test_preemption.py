"""Preemption and dead loader workers, in both phases, as a batch system does them (issue: round three).

* SIGTERM to the whole process group (Slurm's ``scancel``, preemption, systemd): every loader worker gets it
  too. The command ends with one ``interrupted:`` line and status 143, never a traceback or status 1, its
  position saved (phase 2: ``last.pth``; phase 1: every finished unit);
* one loader worker killed alone (SIGKILL: the OOM killer; or SIGTERM to its pid): one ``error:`` line naming
  the worker and status 2, never a DataLoader traceback; the position is saved as for a stop.

Each run is killed as soon as it has done its first step (phase 2) or finished its first unit (phase 1).
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from conftest import (
    ROOT,
    cache_cli_args,
    child_env,
    done_markers,
    stillroom_cmd,
    student_config,
    tiny_cache_config,
    write_digits_shards,
)

from pipeline.phase1.cache_teacher import run as cache_teacher

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

SAMPLES, PER_SHARD = 480, 40  # lanes of 240 copies (8 chunks): a worker is needed again after its first chunks
CACHE = {"views": 1, "view_block": 1, "batch_size": 20, "workers": 0}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_digits_shards(tmp_path_factory.mktemp("shards"), SAMPLES, PER_SHARD)


@pytest.fixture(scope="module")
def cache(shards: str, tiny_teacher: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted cache (made once, in this process): what a stopped and re-run phase 1 must give."""
    out = tmp_path_factory.mktemp("cache") / "cache.zarr"
    cache_teacher(tiny_cache_config(shards, tiny_teacher, out, **CACHE))
    return out


def _start(args: list[str], log: Path) -> subprocess.Popen:
    """A stillroom command in a process group of its own (as a batch system starts a job)."""
    f = open(log, "w")  # noqa: SIM115 (closed by _finish)
    p = subprocess.Popen(
        [*stillroom_cmd(), *args], cwd=ROOT, env=child_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
    )
    p.log_file = f  # type: ignore[attr-defined]
    return p


def _finish(p: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    try:
        rc = p.wait(timeout=timeout)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        p.log_file.close()  # type: ignore[attr-defined]
    return rc, Path(p.log_file.name).read_text()  # type: ignore[attr-defined]


def _wait_for(p: subprocess.Popen, ready, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert p.poll() is None, f"ended before {what}:\n{Path(p.log_file.name).read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} in {timeout} s"
        time.sleep(0.01)


def _workers(pid: int) -> list[int]:
    """The loader worker processes of ``pid`` (its children)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return sorted(out)


def _one_line(text: str, prefix: str) -> str:
    """The output holds no traceback and exactly one line starting with ``prefix``; returns it."""
    assert "Traceback" not in text and "Error:" not in text.replace("error:", ""), text[-4000:]
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, text[-4000:]
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# Phase 2


def _train_args(shards: str, cache: Path, out: Path, tmp: Path) -> list[str]:
    cfg = student_config(shards, str(cache), out, epochs=50, workers=2, shuffle_buffer=16, deterministic=False)
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    return ["train-student", "--config", str(path)]


def _first_step(out: Path):
    return lambda: (out / "metrics.jsonl").exists() and '"event": "train"' in (out / "metrics.jsonl").read_text()


def test_sigterm_to_the_process_group_ends_train_student_with_143_ten_times(shards, cache, tmp_path):
    """Ten runs (two at a time: one per core), each sent SIGTERM to its group after its first step."""
    rng = random.Random(26)
    for pair in range(5):
        runs = []
        for i in (2 * pair, 2 * pair + 1):
            out = tmp_path / f"run{i}"
            runs.append((i, out, _start(_train_args(shards, cache, out, tmp_path), tmp_path / f"run{i}.log")))
        for _, out, p in runs:
            _wait_for(p, _first_step(out), "first step")
            time.sleep(rng.uniform(0.0, 0.3))  # now and then while a step, a prefetch or a checkpoint runs
            os.killpg(p.pid, signal.SIGTERM)
        for i, out, p in runs:
            rc, text = _finish(p)
            assert rc == 143, (i, rc, text[-4000:])
            line = _one_line(text, "interrupted:")
            assert "add --resume to continue" in line, line
            state = torch.load(out / "last.pth", weights_only=True)
            assert state["epoch"] < 50 and (state["epoch"], state["step_in_epoch"]) != (0, 0), (i, state["epoch"])


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_dead_loader_worker_ends_train_student_with_one_line_and_2(shards, cache, tmp_path, signum):
    out = tmp_path / "run"
    p = _start(_train_args(shards, cache, out, tmp_path), tmp_path / "run.log")
    _wait_for(p, _first_step(out), "first step")
    workers = _workers(p.pid)
    assert len(workers) == 2, workers
    os.kill(workers[0], signum)
    rc, text = _finish(p)
    assert rc == 2, (rc, text[-4000:])
    line = _one_line(text, "error:")
    assert "loader worker" in line and "--resume" in line, line
    state = torch.load(out / "last.pth", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) != (0, 0), "the position it reached is saved"
    assert f"stopped at epoch {state['epoch']} step {state['step_in_epoch']}" in line, line


# ---------------------------------------------------------------------------------------------------------
# Phase 1


def _cache_args(shards: str, teacher: str, out: Path) -> list[str]:
    return cache_cli_args(shards, teacher, out, **{**CACHE, "workers": 2})


def _same_as(out: Path, reference: Path) -> None:
    a, b = zarr.open_group(str(out), mode="r"), zarr.open_group(str(reference), mode="r")
    for name in ("values", "indices", "logsumexp", "labels", "keys", "digests", "done"):
        assert np.array_equal(np.asarray(a[name][...]), np.asarray(b[name][...])), name


def test_sigterm_to_the_process_group_ends_cache_teacher_with_143(shards, cache, tiny_teacher, tmp_path):
    """Three tries into one cache, each stopped after its first new unit, then a run to the end: the
    cache an uninterrupted run gives (each try's finished units are kept, none is half-written)."""
    out = tmp_path / "cache.zarr"
    for i in range(3):
        before = done_markers(out)
        p = _start(_cache_args(shards, tiny_teacher, out), tmp_path / f"try{i}.log")
        _wait_for(p, lambda: done_markers(out) > before, "finished unit")  # noqa: B023
        os.killpg(p.pid, signal.SIGTERM)
        rc, text = _finish(p)
        assert rc == 143, (i, rc, text[-4000:])
        line = _one_line(text, "interrupted:")
        assert "run the same command again" in line, line
        assert done_markers(out) > before
    cache_teacher(tiny_cache_config(shards, tiny_teacher, out, **CACHE))  # to the end, in this process
    _same_as(out, cache)


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_dead_loader_worker_ends_cache_teacher_with_one_line_and_2(shards, tiny_teacher, tmp_path, signum):
    out = tmp_path / "cache.zarr"
    p = _start(_cache_args(shards, tiny_teacher, out), tmp_path / "run.log")
    _wait_for(p, lambda: done_markers(out) > 0, "finished unit")
    workers = _workers(p.pid)
    assert len(workers) == 2, workers
    os.kill(workers[0], signum)
    rc, text = _finish(p)
    assert rc == 2, (rc, text[-4000:])
    line = _one_line(text, "error:")
    assert "loader worker" in line and "again" in line, line
    assert done_markers(out) > 0
