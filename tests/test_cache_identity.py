"""No unit of a cache can be adopted by another identity (issue: nothing wrong passes silently, round two).

A unit's checksum binds the cache's fingerprint (both identities: the views and the teacher), and its
marker names the fingerprint that wrote it. So a cache whose group metadata was lost and which another
teacher or seed then "completes" keeps none of the old units: each is found written for another cache
and redone, whatever ``--verify-done`` says, and training reads only the new teacher's targets.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import tiny_cache_config

from pipeline.cache import PER_VIEW, open_cache
from pipeline.errors import CacheError, ConfigError
from pipeline.phase1.cache_teacher import run as cache_teacher

pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = {"views": 2, "view_block": 1}


@pytest.fixture(scope="module")
def made(digits_shards: str, tiny_teacher: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished cache, and another teacher's weights (the same net, other numbers)."""
    folder = tmp_path_factory.mktemp("identity")
    other = folder / "other.pth"
    weights = torch.load(tiny_teacher, weights_only=True)
    torch.save({k: v * 1.05 if v.is_floating_point() else v for k, v in weights.items()}, other)
    cache = folder / "a.zarr"
    cache_teacher(tiny_cache_config(digits_shards, tiny_teacher, cache, **SETTINGS))
    return {"cache": cache, "other": other}


def targets(path: Path) -> dict[str, bytes]:
    g = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(g[name][...]).tobytes() for name in ("values", "indices", "logsumexp")}


@pytest.mark.parametrize("verify_done", [True, False])
@pytest.mark.parametrize("change", ["teacher", "seed"])
def test_lost_group_metadata_lets_no_other_identity_adopt_a_unit(
    made: dict[str, Path], digits_shards: str, tiny_teacher: str, tmp_path: Path, change: str, verify_done: bool
) -> None:
    copy = tmp_path / "copy.zarr"
    shutil.copytree(made["cache"], copy)
    (copy / "zarr.json").unlink()  # the group's metadata (with the attributes) is lost
    kw = {"teacher_checkpoint": str(made["other"])} if change == "teacher" else {"seed": 7}
    cfg = tiny_cache_config(digits_shards, tiny_teacher, copy, verify_done=verify_done, **{**SETTINGS, **kw})
    summary = cache_teacher(cfg)
    assert summary["units_skipped"] == 0 and summary["units_damaged"] == 6 and summary["units_done"] == 6, summary
    fresh = tmp_path / "fresh.zarr"
    cache_teacher(tiny_cache_config(digits_shards, tiny_teacher, fresh, **{**SETTINGS, **kw}))
    assert targets(copy) == targets(fresh), "every unit holds the new identity's targets"
    assert targets(copy) != targets(made["cache"])


def test_a_unit_written_for_another_cache_is_named_as_such(
    made: dict[str, Path], digits_shards, tiny_teacher, tmp_path
):
    """A unit copied in from another cache (another seed) is refused by readers, saying so."""
    other = tmp_path / "seed7.zarr"
    cache_teacher(tiny_cache_config(digits_shards, tiny_teacher, other, seed=7, **SETTINGS))
    mixed = tmp_path / "mixed.zarr"
    shutil.copytree(made["cache"], mixed)
    for name in (*PER_VIEW, "done"):
        shutil.copyfile(other / name / "c" / "1" / "2" / "0", mixed / name / "c" / "1" / "2" / "0")
    with pytest.raises(
        CacheError, match=r"views 1-1 of shard 'train-000002\.tar' is damaged: it was written by another cache"
    ):
        open_cache(str(mixed)).read_block(1, 2)


def test_a_bad_job_index_is_refused_before_anything_is_created(digits_shards, tiny_teacher, tmp_path):
    out = tmp_path / "never.zarr"
    with pytest.raises(ConfigError, match=r"job index 3 is not in \[0, 3\)"):
        cache_teacher(tiny_cache_config(digits_shards, tiny_teacher, out, job_index=3, job_count=3, **SETTINGS))
    assert not out.exists()


def test_two_identities_kept_apart(made: dict[str, Path], digits_shards, tmp_path):
    """Another teacher over the same views: the same views fingerprint, another teacher fingerprint."""
    other = tmp_path / "b.zarr"
    cache_teacher(tiny_cache_config(digits_shards, str(made["other"]), other, **SETTINGS))
    a, b = open_cache(str(made["cache"])).meta, open_cache(str(other)).meta
    assert a.views_fingerprint == b.views_fingerprint and a.teacher_fingerprint != b.teacher_fingerprint
    assert a.fingerprint != b.fingerprint


def test_a_shard_rebuilt_between_runs_invalidates_its_older_units(digits_shards, tiny_teacher, tmp_path):
    """A killed run left view 0 of every shard done; one shard is then rebuilt with other samples under
    the same name and count. The re-run computes view 1 from the new samples, says the shard changed and
    marks view 0 of it not done (no unit of other samples is kept); the next run makes the cache whole."""
    from conftest import write_digits_shards

    shards = write_digits_shards(tmp_path / "s", 120, 40)
    out = tmp_path / "c.zarr"
    cache_teacher(tiny_cache_config(shards, tiny_teacher, out, view_range="0:1", **SETTINGS))
    rebuilt = Path(write_digits_shards(tmp_path / "other", 40, 40, offset=500)).parent / "train-000000.tar"
    shutil.copyfile(rebuilt, tmp_path / "s" / "train-000000.tar")  # the same name and count, other digits
    summary = cache_teacher(tiny_cache_config(shards, tiny_teacher, out, view_range="1:2", **SETTINGS))
    assert summary["units_invalidated"] == 1 and summary["units_done"] == 3
    assert not open_cache(str(out)).done_mask()[0, 0]
    again = cache_teacher(tiny_cache_config(shards, tiny_teacher, out, **SETTINGS))
    assert again["units_done"] == 1 and open_cache(str(out)).done_mask().all()


def test_a_teacher_whose_output_is_not_finite_is_refused(digits_shards, tiny_teacher, tmp_path):
    weights = torch.load(tiny_teacher, weights_only=True)
    head = next(k for k in weights if k.endswith("fc.weight"))
    weights[head][0, 0] = float("nan")
    torch.save(weights, tmp_path / "nan.pth")
    with pytest.raises(ConfigError, match=r"the teacher's output is not finite .* on views 0-0 of shard"):
        cache_teacher(tiny_cache_config(digits_shards, str(tmp_path / "nan.pth"), tmp_path / "c.zarr", **SETTINGS))
