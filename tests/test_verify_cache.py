"""``verify-cache`` checks what ``train-student`` checks (issue 26, item 5), and covers every shard by default.

* Labels: shards whose ``.cls`` all changed after caching: train-student refused, verify-cache said ok.
* Library versions other than the cache's: train-student warns; verify-cache warns too and lists them.
* Samples read when the cache was made that cannot be read now are named.
* Its default picks put at least one (sample, view) of every shard through the live teacher.
"""

from __future__ import annotations

import io
import logging
import shutil
import tarfile
from pathlib import Path

import pytest
from conftest import break_one_image, student_config, tiny_cache_config

import pipeline.cache.meta
from pipeline.errors import CacheError
from pipeline.inspection.verify import _pick, verify
from pipeline.options import VerifyConfig
from pipeline.phase1.cache_teacher import run as cache_teacher
from pipeline.phase2.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(digits_shards: str, tiny_teacher: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("verify") / "cache.zarr"
    cache_teacher(tiny_cache_config(digits_shards, tiny_teacher, out, views=2, view_block=1))
    return str(out)


def relabel(shards: str, out: Path, name: str) -> str:
    """A copy of the shards where every ``.cls`` of shard ``name`` is another class (same keys, images, count)."""
    shutil.copytree(Path(shards).parent, out)
    tar = out / name
    with tarfile.open(tar) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    with tarfile.open(tar, "w") as t:
        for m, data in members:
            if m.name.endswith(".cls"):
                data = str((int(data) + 1) % 10).encode()
                m.size = len(data)
            t.addfile(m, io.BytesIO(data))
    return str(out / Path(shards).name)


def test_labels_changed_after_caching_are_a_problem(
    cache: str, digits_shards: str, tiny_teacher: str, tmp_path: Path
) -> None:
    shards = relabel(digits_shards, tmp_path / "shards", "train-000001.tar")
    with pytest.raises(CacheError, match="label"):
        train(student_config(shards, cache, tmp_path / "run", epochs=1))
    report = verify(VerifyConfig(cache=cache, shards=[shards], teacher_checkpoint=tiny_teacher, samples=8))
    assert not report["ok"], report
    (problem,) = [p for p in report["problems"] if "labels differ" in p]
    assert "shard 'train-000001.tar': 40 of 40 labels differ from the cache's" in problem, problem


def without_label(shards: str, out: Path, name: str, index: int) -> str:
    """A copy of the shards where one sample of shard ``name`` lost its ``.cls`` (same count, keys, images)."""
    shutil.copytree(Path(shards).parent, out)
    tar = out / name
    with tarfile.open(tar) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    dropped = sorted(m.name for m, _ in members if m.name.endswith(".cls"))[index]
    with tarfile.open(tar, "w") as t:
        for m, data in members:
            if m.name != dropped:
                t.addfile(m, io.BytesIO(data))
    return str(out / Path(shards).name)


def test_a_sample_unreadable_now_is_named(cache: str, digits_shards: str, tiny_teacher: str, tmp_path: Path) -> None:
    shards = without_label(digits_shards, tmp_path / "unlabelled", "train-000001.tar", 5)
    report = verify(VerifyConfig(cache=cache, shards=[shards], teacher_checkpoint=tiny_teacher, samples=8))
    assert not report["ok"]
    wanted = (
        "shard 'train-000001.tar': 1 sample(s) read when the cache was made cannot be read now (first at position 5)"
    )
    assert wanted in report["problems"], report["problems"]
    assert not any("cannot be decoded here" in p for p in report["problems"]), "reported once"
    # bytes that decode no more (here: 16 bytes zeroed, so the image digest names it too)
    shards, _ = break_one_image(digits_shards, tmp_path / "broken")
    report = verify(VerifyConfig(cache=cache, shards=[shards], teacher_checkpoint=tiny_teacher, samples=8))
    assert any("1 sample(s) read when the cache was made cannot be decoded here" in p for p in report["problems"])


def test_library_versions_other_than_the_cache_s_warn_as_in_training(
    cache: str,
    digits_shards: str,
    tiny_teacher: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    real = pipeline.cache.meta.library_versions
    monkeypatch.setattr(pipeline.cache.meta, "library_versions", lambda: {**real(), "torch": "0.0.1"})
    with caplog.at_level(logging.WARNING):
        report = verify(VerifyConfig(cache=cache, shards=[digits_shards], teacher_checkpoint=tiny_teacher, samples=4))
    assert report["library_versions_differ"] == [f"torch: cache {real()['torch']}, here 0.0.1"]
    assert any("LIBRARY VERSIONS DIFFER FROM THE CACHE" in r.getMessage() for r in caplog.records)
    assert report["ok"], "the pixels still replay equal: a warning, as in train-student"


def test_default_picks_cover_every_shard(cache: str) -> None:
    from pipeline.cache import open_cache

    opened = open_cache(cache)
    intact = {s: [0, 1] for s in range(3)}
    assert sorted(_pick(opened, intact, None, seed=0)) == [0, 1, 2]
    assert sorted(_pick(opened, intact, 2, seed=0)) == [0, 1], "one in every shard first, in order"
    many = {s: [0] for s in range(100)}  # more shards than the old default of 64 samples
    object.__setattr__(opened.meta, "shards", opened.meta.shards * 34)
    assert len(_pick(opened, many, None, seed=0)) == 100
