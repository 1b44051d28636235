"""Phase 1 never waits on storage: finished units are written by a background thread.

On an object store one unit's writes take hundreds of milliseconds; written inline, the teacher idles
for each. Here every unit write sleeps 0.3 s (a slow store) while the teacher needs ~0.4 s a unit: the
teacher's thread loses only the final drain (about one write), not 0.3 s per unit as a synchronous
writer does, and the three caches (fast store, slow store, synchronous writer) are byte-identical.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_cache_config

import pipeline.phase1.cache_teacher as phase1
import pipeline.phase1.unit_writer as unit_writer
from pipeline.cache import Cache
from pipeline.phase1.cache_teacher import run

SETTINGS = {"views": 4, "view_block": 1, "batch_size": 10}  # 12 units of 4 batches
UNITS = 12
WRITE_S = 0.3  # per unit, the slow store
TEACHER_S = 0.1  # per batch: ~0.4 s of teacher per unit, more than a write

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


class _SlowTeacher(torch.nn.Module):
    """The teacher plus a fixed time per batch (sleeping, so the writer thread can run meanwhile)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(TEACHER_S)
        return self.inner(x)


def files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _run(monkeypatch, shards: str, teacher: str, out: Path, write_s: float, queue_units: int) -> dict:
    real_build, real_write = phase1.build_teacher, Cache.write_unit
    writes: list[tuple[str, float]] = []

    def build(*args, **kw):
        model, ident = real_build(*args, **kw)
        return _SlowTeacher(model), ident

    def write_unit(self, *args, **kw):
        t0 = time.perf_counter()
        time.sleep(write_s)
        real_write(self, *args, **kw)
        writes.append((threading.current_thread().name, time.perf_counter() - t0))

    with monkeypatch.context() as m:
        m.setattr(phase1, "build_teacher", build)
        m.setattr(Cache, "write_unit", write_unit)
        m.setattr(unit_writer, "WRITE_QUEUE_UNITS", queue_units)
        summary = run(tiny_cache_config(shards, teacher, out, **SETTINGS))
    assert summary["units_done"] == UNITS and len(writes) == UNITS
    summary["writes_s"] = sum(dt for _, dt in writes)
    summary["writer_threads"] = {name for name, _ in writes}
    return summary


def test_teacher_does_not_wait_on_a_slow_store(monkeypatch, tmp_path, digits_shards, tiny_teacher):
    fast = _run(monkeypatch, digits_shards, tiny_teacher, tmp_path / "fast", 0.0, unit_writer.WRITE_QUEUE_UNITS)
    slow = _run(monkeypatch, digits_shards, tiny_teacher, tmp_path / "slow", WRITE_S, unit_writer.WRITE_QUEUE_UNITS)
    inline = _run(monkeypatch, digits_shards, tiny_teacher, tmp_path / "inline", WRITE_S, 0)
    print(
        f"wall: fast store {fast['wall_s']:.2f}s, slow store {slow['wall_s']:.2f}s, slow store written inline "
        f"{inline['wall_s']:.2f}s; teacher thread blocked on writes: {slow['write_wait_s']:.2f}s vs "
        f"{inline['write_wait_s']:.2f}s inline ({slow['writes_s']:.2f}s of writes)"
    )
    assert all(name.startswith("cache-writer") for name in slow["writer_threads"])
    assert inline["writer_threads"] == {"MainThread"}
    assert slow["writes_s"] >= UNITS * WRITE_S
    # Only the final drain (about one write) is lost, not a write per unit.
    assert slow["write_wait_s"] < 3 * WRITE_S, slow
    assert inline["write_wait_s"] >= UNITS * WRITE_S, inline
    # Wall time: the slow store costs about one write, the inline writer all twelve (3.6 s).
    assert slow["wall_s"] < inline["wall_s"] - UNITS * WRITE_S / 2, (slow["wall_s"], inline["wall_s"])
    assert files(tmp_path / "slow") == files(tmp_path / "fast") == files(tmp_path / "inline")
