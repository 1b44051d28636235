"""A run is never lost to ``--force-new``, and its account stays true across a resume (issue 26, items 3, 7).

* ``--force-new`` checks the new run's data, caches, model and options before it moves the previous run
  aside: a new run that cannot start leaves the previous one in place, and ``--resume`` still continues it.
* Under ``--on-error skip``, the epoch event of a run stopped mid-epoch and resumed counts the copies
  skipped and the slots filled in the steps before the stop too: the same account as a run never stopped.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from conftest import break_one_image, student_config, tiny_cache_config

from pipeline.errors import StillroomError
from pipeline.interrupt import RunInterrupted
from pipeline.phase1.cache_teacher import run as cache_teacher
from pipeline.phase2.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(digits_shards: str, tiny_teacher: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("account") / "cache.zarr"
    cache_teacher(tiny_cache_config(digits_shards, tiny_teacher, out, views=2, view_block=1))
    return str(out)


def files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def events(out: Path, kind: str) -> list[dict]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["event"] == kind]


def test_force_new_checks_everything_before_it_moves_the_run_aside(
    cache: str, digits_shards: str, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    cfg = student_config(digits_shards, cache, out, epochs=1, max_steps_per_epoch=2)
    train(cfg)
    before = files(out)
    missing = str(tmp_path / "nothing-here")
    for bad in (
        {"cache": [str(tmp_path / "no-such-cache.zarr")]},  # cannot open cache
        {"shards": [missing + "-{000000..000002}.tar"]},  # no shards
        {"model": "no_such_model"},
        {"teacher_mode": "live", "teacher_checkpoint": [missing + ".pth"]},
        {"recipe": {"name": "deit", "img_size": 32, "mixup": 0.5}},  # another recipe than the cache's
    ):
        with pytest.raises(StillroomError):
            train(dataclasses.replace(cfg, force_new=True, **bad))
        assert files(out) == before, f"--force-new with {bad} changed OUT before failing"
    train(dataclasses.replace(cfg, resume=True))  # the run is still there, and is continued (here: done)
    assert [e["first_epoch"] for e in events(out, "start")] == [0, 1], "the resume did not find the run"
    train(dataclasses.replace(cfg, force_new=True))  # a new run that can start moves the old one aside
    (aside,) = out.glob("replaced-*")
    assert (aside / "last.pth").read_bytes() == before["last.pth"]
    assert [e["first_epoch"] for e in events(out, "start")] == [0]


@pytest.mark.parametrize("stop_at", [3, 9])
def test_the_account_of_a_resumed_epoch_counts_the_steps_before_the_stop(
    cache: str, digits_shards: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop_at: int
) -> None:
    shards, _ = break_one_image(digits_shards, tmp_path / "shards")
    base = student_config(shards, cache, tmp_path / "whole", on_error="skip", epochs=1, shuffle_buffer=32)
    train(base)
    (whole,) = events(tmp_path / "whole", "epoch")
    assert whole["copies"]["filled"] == 2 and sum(whole["copies"]["skipped"].values()) == 2
    cfg = dataclasses.replace(base, out=str(tmp_path / "stopped"))
    monkeypatch.setenv("STILLROOM_DEBUG_STOP_AT_STEP", str(stop_at))
    with pytest.raises(RunInterrupted):
        train(cfg)
    monkeypatch.delenv("STILLROOM_DEBUG_STOP_AT_STEP")
    train(dataclasses.replace(cfg, resume=True))
    (resumed,) = events(tmp_path / "stopped", "epoch")
    assert resumed["copies"] == whole["copies"]
