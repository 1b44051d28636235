"""Faults a real run meets: a full disk mid-unit, a cache from other data, bad flags, SIGKILL.

* disk full (``ENOSPC``) after a unit's data chunks but before its completion marker: the error
  surfaces, the unit is not claimed, and a rerun gives the bytes of an uninterrupted run;
* a cache built from other shards, or from shards with the same names and counts but other
  samples, is refused naming the shard (and the position, for the key check);
* ``--topk`` larger than the classes and a ``--tau`` that is not cached are refused;
* ``stillroom cache-teacher`` SIGKILLed at 3 seeded random points, resumed each time: the final
  arrays equal an uninterrupted run's and every unit is done once with its shard's count.
"""

from __future__ import annotations

import errno
import os
import random
import re
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
    TINY_CACHE,
    done_markers,
    stillroom_cmd,
    student_config,
    tiny_cache_config,
    write_digits_shards,
)

from pipeline.cache import ARRAYS
from pipeline.errors import CacheError, ConfigError, StorageError
from pipeline.options import CacheConfig
from pipeline.phase1.cache_teacher import run
from pipeline.phase2.train import train
from pipeline.train_options import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPE = {"name": "deit"}
SETTINGS = {
    **TINY_CACHE,
    "recipe": RECIPE,
    "views": 4,
    "view_block": 1,
    # One batch size for every run: teacher output bits depend on the batch size (measured:
    # logsumexp bytes differed between batch 40 and batch 4 with everything else equal).
    "batch_size": 4,
}
UNITS = 12  # 3 shards x 4 view blocks
# Subprocesses use the test process's intra-op thread count: teacher outputs can differ in the
# last bits between thread counts (measured: logsumexp differed between 1 and 2 threads).
_THREADS = str(torch.get_num_threads())
ENV = {**os.environ, "OMP_NUM_THREADS": _THREADS, "MKL_NUM_THREADS": _THREADS, "PYTHONUNBUFFERED": "1"}


def _cache_cfg(shards: str, teacher: str, out: Path, **kw) -> CacheConfig:
    return tiny_cache_config(shards, teacher, out, **{**SETTINGS, **kw})


def _arrays(out: Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(out), mode="r")
    return {name: np.asarray(g[name][...]) for name in ARRAYS}


def _files(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and not p.name.endswith(".partial")
    }


def _assert_same(out: Path, ref: Path) -> None:
    a, b = _arrays(out), _arrays(ref)
    assert (a["done"][..., 0] == 40).all(), f"every unit done once with its shard's count: {a['done'][..., 0]}"
    for name in ARRAYS:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        if name == "keys":
            assert a[name].tolist() == b[name].tolist()
        else:
            assert a[name].tobytes() == b[name].tobytes(), f"{name} differs from the uninterrupted run"
    fa, fb = _files(out), _files(ref)
    assert sorted(fa) == sorted(fb)
    assert [n for n in fa if fa[n] != fb[n]] == [], "stored objects differ from the uninterrupted run"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits_shards, tiny_teacher) -> Path:
    """One uninterrupted in-process run (workers 0)."""
    out = tmp_path_factory.mktemp("faults-ref") / "cache"
    summary = run(_cache_cfg(digits_shards, tiny_teacher, out))
    assert summary["units_done"] == UNITS
    return out


# -- (a) disk full between a unit's data and its completion marker ---------------------------------
def test_disk_full_before_done_marker_is_not_claimed(tmp_path, monkeypatch, reference, digits_shards, tiny_teacher):
    out = tmp_path / "cache"
    array_type = type(zarr.open_group(str(reference), mode="r")["done"])
    real_setitem = array_type.__setitem__
    markers: list[tuple] = []  # units whose marker was written; the second one fails

    def setitem(self, key, value):
        if self.path.rsplit("/", 1)[-1] == "done":
            markers.append(tuple(int(x) for x in key[:2]))  # key: (block, shard, all of count and checksum)
            if len(markers) == 2:
                raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        return real_setitem(self, key, value)

    monkeypatch.setattr(array_type, "__setitem__", setitem)
    # The background writer's failure surfaces in the run, as one error line naming the unit and the cache.
    with pytest.raises(StorageError, match=r"cannot write views \d-\d of shard 'train-00000\d\.tar' to cache") as e:
        run(_cache_cfg(digits_shards, tiny_teacher, out))
    assert e.value.__cause__.errno == errno.ENOSPC
    monkeypatch.undo()

    done = _arrays(out)["done"][..., 0]
    first, failed = markers
    assert done[first] == 40 and done[failed] == -1, done  # the failed unit is not claimed
    assert int((done >= 0).sum()) == 1, done
    # Its data chunks were written before the disk filled up: present on disk, yet not claimed.
    g = zarr.open_group(str(out), mode="r")
    rows = slice(failed[1] * 40, (failed[1] + 1) * 40)
    assert (np.asarray(g["indices"][failed[0], rows, 0]) >= 0).all()

    summary = run(_cache_cfg(digits_shards, tiny_teacher, out))
    assert (summary["units_done"], summary["units_skipped"]) == (UNITS - 1, 1)
    _assert_same(out, reference)


# -- (b) a cache built from other shards ------------------------------------------------------------
def _train_cfg(tmp_path: Path, shards: str, cache: Path, **kw) -> TrainConfig:
    """conftest's tiny student, hard distillation, a two-step epoch: these tests only need it to start."""
    return student_config(
        shards,
        str(cache),
        tmp_path / "run",
        epochs=1,
        max_steps_per_epoch=2,
        warmup_epochs=0,
        deterministic=False,
        **kw,
    )


def test_cache_from_other_shards_is_refused(tmp_path, reference):
    other = write_digits_shards(tmp_path / "other", 40, 40, prefix="other", offset=600)
    with pytest.raises(CacheError, match=r"shard 'other-000000\.tar'.*is not in cache"):
        train(_train_cfg(tmp_path, other, reference))


def test_same_names_other_samples_caught_by_key_check(tmp_path, reference):
    # Same shard names and counts as the cache's, different digits inside.
    swapped = write_digits_shards(tmp_path / "swapped", 120, 40, prefix="train", offset=700)
    with pytest.raises(CacheError, match=r"shard '.*train-00000\d\.tar' position \d+: cache .* row holds key") as e:
        train(_train_cfg(tmp_path, swapped, reference))
    assert "not built from these shards" in str(e.value)


# -- (c) bad flags --------------------------------------------------------------------------------
def test_topk_larger_than_classes_is_refused(tmp_path, digits_shards, tiny_teacher):
    with pytest.raises(ConfigError, match=r"--topk 11 is larger than the number of classes \(10\)"):
        run(_cache_cfg(digits_shards, tiny_teacher, tmp_path / "cache", topk=11))
    assert not (tmp_path / "cache").exists()


def test_uncached_temperature_is_refused(tmp_path, reference, digits_shards):
    cfg = _train_cfg(tmp_path, digits_shards, reference, distillation="soft", tau=2.0)
    with pytest.raises(ConfigError, match=r"--tau 2\.0 is not a cached temperature of cache .* \(\[1\.0, 3\.0\]\)"):
        train(cfg)


# -- (d) SIGKILL at random points, resumed each time ------------------------------------------------
@pytest.mark.slow
def test_sigkill_at_random_points_then_resume(tmp_path, reference, digits_shards, tiny_teacher):
    config = tmp_path / "cache.yaml"
    out = tmp_path / "cache"
    config.write_text(
        yaml.safe_dump({**SETTINGS, "shards": digits_shards, "out": str(out), "teacher_checkpoint": tiny_teacher})
    )
    args = [*stillroom_cmd(), "cache-teacher", "--config", str(config)]
    rng = random.Random(1234)
    before = 0
    for kill in range(3):
        target = before + rng.randint(0, 2)  # units to finish first, then a random moment inside the next one
        delay = rng.uniform(0.0, 0.4)
        log = tmp_path / f"run{kill}.txt"
        with open(log, "w") as f:
            p = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + 60
            while done_markers(out) < max(target, 0) or not (out / "done").exists():
                assert p.poll() is None, f"finished before kill {kill}:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"no progress in 60 s:\n{log.read_text()}"
                time.sleep(0.005)
            time.sleep(delay)
            assert p.poll() is None, f"finished before kill {kill}:\n{log.read_text()}"
            os.killpg(p.pid, signal.SIGKILL)
            assert p.wait() == -signal.SIGKILL
        now = done_markers(out)
        assert before <= now < UNITS, (kill, before, now)
        done = _arrays(out)["done"][..., 0]
        assert int((done >= 0).sum()) == now and set(done[done >= 0].tolist()) <= {40}
        before = now
    text = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert text.returncode == 0, text.stdout + text.stderr
    m = re.search(r"cache-teacher: (\d+) units done, (\d+) skipped", text.stdout)
    assert m and (int(m.group(1)), int(m.group(2))) == (UNITS - before, before), text.stdout
    _assert_same(out, reference)
