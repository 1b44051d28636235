"""Creating a cache is idempotent: killed creators, creators starting at once, old formats, other folders.

A job killed while creating the cache used to leave a group ``zarr.json`` without attributes; every
retry then waited ~2 minutes for "another worker" and failed, ``--force-new`` did not help, and
``cache-status`` said "not a stillroom cache". Now every job writes whichever array metadata is
missing (never overwriting), then the group's attributes last, so:

* a half-created cache (group only; arrays only; group and some arrays) is completed by the next
  ``cache-teacher``, into the very bytes of a cache created in one go; ``cache-status`` says what it is;
* one begun with other settings is refused naming the array (``--force-new`` replaces it);
* several creators starting at once into one new location leave the bytes of a single creation;
* a format-1 cache is refused with a message saying to rebuild it; a foreign folder is never touched.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import zarr
from conftest import cache_cli_args, child_env, tiny_cache_config
from typer.testing import CliRunner

from cli.main import app
from pipeline.cache import ARRAYS, CacheMeta, create_or_open, damaged_units, open_cache
from pipeline.errors import CacheError
from pipeline.phase1.cache_teacher import run

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"views": 2, "view_block": 1, "batch_size": 20}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, digits_shards, tiny_teacher) -> Path:
    out = tmp_path_factory.mktemp("pristine") / "cache"
    run(tiny_cache_config(digits_shards, tiny_teacher, out, **SETTINGS))
    return out


@pytest.fixture(scope="module")
def meta(pristine) -> CacheMeta:
    """The settings of ``pristine``, as the job that made it had them."""
    return open_cache(str(pristine)).meta


def files(out: Path, metadata_only: bool = False) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and not p.name.endswith(".partial") and (p.name == "zarr.json" or not metadata_only)
    }


def invoke(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def teacher_args(shards: str, teacher: str, out: Path, *extra: str) -> list[str]:
    return [*cache_cli_args(shards, teacher, out, **SETTINGS, workers=None), *extra]


def half_created(out: Path, pristine: Path, group: bool, arrays: tuple[str, ...]) -> None:
    """What a killed creator leaves: an attribute-less group ``zarr.json`` and/or some arrays' metadata."""
    if group:
        zarr.open_group(str(out), mode="w-")  # exactly what zarr writes first when it creates a group
    for name in arrays:
        (out / name).mkdir(parents=True)
        shutil.copy(pristine / name / "zarr.json", out / name / "zarr.json")
    assert out.exists()


# -- a killed creator ---------------------------------------------------------------------------------
def test_killed_creator_group_only_is_reported_then_completed(tmp_path, pristine, digits_shards, tiny_teacher):
    out = tmp_path / "cache"
    half_created(out, pristine, group=True, arrays=())
    code, text = invoke("cache-status", out)
    assert code == 2 and "was not fully created" in text and "run cache-teacher" in text, text
    assert "not a stillroom cache" not in text
    with pytest.raises(CacheError, match="was not fully created"):
        open_cache(str(out))

    t0 = time.monotonic()
    code, text = invoke(*teacher_args(digits_shards, tiny_teacher, out))
    assert code == 0 and "6 units done, 0 skipped" in text, text
    assert "timed out" not in text and time.monotonic() - t0 < 100
    assert files(out) == files(pristine), "completed: the bytes of a cache created in one go"
    code, text = invoke("cache-status", out)
    assert code == 0 and json.loads(text)["units_done"] == 6, text


@pytest.mark.parametrize(
    "group, arrays",
    [
        (False, ("values", "indices")),  # the new creator killed between arrays and attributes
        (True, ("values", "done")),  # the old creator killed between arrays
        (True, ARRAYS),  # the old creator killed just before the attributes
    ],
    ids=["arrays-only", "group-and-some", "group-and-all"],
)
@pytest.mark.parametrize("force_new", [False, True])
def test_half_created_cache_is_completed_in_place(tmp_path, pristine, meta, group, arrays, force_new):
    out = tmp_path / "cache"
    half_created(out, pristine, group, arrays)
    with pytest.raises(CacheError, match="was not fully created"):
        open_cache(str(out))
    cache = create_or_open(str(out), meta, force_new=force_new)
    assert cache.meta.fingerprint == meta.fingerprint
    assert files(out) == files(pristine, metadata_only=True)


def test_half_created_with_other_settings_is_refused_naming_the_array(tmp_path, pristine, meta):
    out = tmp_path / "cache"
    other = replace(meta, topk=3)
    create_or_open(str(out), other)
    (out / "zarr.json").unlink()  # killed before the attributes: its arrays have topk 3
    with pytest.raises(CacheError, match=r"array 'values' has shape \[2, 120, 3\] \(expected \[2, 120, 5\]\)") as e:
        create_or_open(str(out), meta)
    assert "--force-new" in str(e.value)
    assert not (out / "zarr.json").exists(), "a refused job writes nothing"
    create_or_open(str(out), meta, force_new=True)
    assert files(out) == files(pristine, metadata_only=True)


def test_deleted_group_metadata_of_a_finished_cache_is_completed_keeping_its_units(tmp_path, pristine, meta):
    out = tmp_path / "cache"
    shutil.copytree(pristine, out)
    (out / "zarr.json").unlink()
    create_or_open(str(out), meta)
    assert files(out) == files(pristine)
    assert (open_cache(str(out)).done_counts() == 40).all()


# -- creators starting at once --------------------------------------------------------------------------
CREATOR = """
import os, pickle, sys, time
from pathlib import Path
from pipeline.cache import create_or_open
meta = pickle.loads(Path(sys.argv[1]).read_bytes())
Path(sys.argv[3]).touch()  # ready
while not os.path.exists(sys.argv[4]):  # go: all start together
    time.sleep(0.001)
create_or_open(sys.argv[2], meta)
"""


@pytest.mark.slow
def test_creators_starting_at_once_leave_the_bytes_of_one(tmp_path, pristine, meta):
    blob = tmp_path / "meta.pkl"
    blob.write_bytes(pickle.dumps(meta))
    env = child_env()
    for round_ in range(1):  # each process imports torch (~10 s on 2 busy cores): one round of three
        out, go = tmp_path / f"cache{round_}", tmp_path / f"go{round_}"
        ready = [tmp_path / f"ready{round_}-{i}" for i in range(3)]
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", CREATOR, str(blob), str(out), str(r), str(go)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for r in ready
        ]
        deadline = time.monotonic() + 120
        while not all(r.exists() for r in ready):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.01)
        go.touch()
        for p in procs:
            text = p.communicate(timeout=120)[0]
            assert p.returncode == 0, text
        assert files(out) == files(pristine, metadata_only=True), f"round {round_}"


# -- what is not a cache of this version ----------------------------------------------------------------
def test_format_version_1_is_refused_with_a_rebuild_message(tmp_path, pristine, digits_shards, tiny_teacher):
    out = tmp_path / "cache"
    shutil.copytree(pristine, out)
    group = json.loads((out / "zarr.json").read_text())
    group["attributes"]["stillroom"]["format_version"] = 1
    group["attributes"]["stillroom"]["recipe"]["mix_window"] = 64  # what format-1 caches recorded
    (out / "zarr.json").write_text(json.dumps(group))
    for command in (["cache-status", out], teacher_args(digits_shards, tiny_teacher, out)):
        code, text = invoke(*command)
        assert code == 2 and "format version 1" in text and "rebuild it" in text and "--force-new" in text, text
        assert "recipe.mix_window: 64" in text, "the old mixup pairing is named too"
    code, text = invoke(*teacher_args(digits_shards, tiny_teacher, out, "--force-new"))
    assert code == 0 and "6 units done" in text, text
    assert files(out) == files(pristine)


def test_format_version_3_is_refused_naming_the_rotating_pixel_checks(tmp_path, pristine, digits_shards, tiny_teacher):
    """Format 4 moved the pixel digests to rows that rotate with the view: a format-3 cache's digests are on
    other rows, so it is rebuilt, never read with the new rule."""
    out = tmp_path / "cache"
    shutil.copytree(pristine, out)
    group = json.loads((out / "zarr.json").read_text())
    group["attributes"]["stillroom"]["format_version"] = 3
    (out / "zarr.json").write_text(json.dumps(group))
    for command in (["cache-status", out], ["verify-cache", out, "--shards", digits_shards]):
        code, text = invoke(*command)
        assert code == 2 and "format version 3" in text and "reads version 4 only" in text, text
        assert "every image is checked" in text and "rebuild it with cache-teacher" in text, text


def test_a_foreign_folder_is_refused_and_left_alone(tmp_path, digits_shards, tiny_teacher):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"not a cache")
    for extra in ((), ("--force-new",)):
        code, text = invoke(*teacher_args(digits_shards, tiny_teacher, out, *extra))
        assert code == 2 and "exists but is not a stillroom cache; choose another --out" in text, text
    assert sorted(p.name for p in out.iterdir()) == ["holiday.jpg"]
    code, text = invoke("cache-status", out)
    assert code == 2 and "is not a stillroom cache" in text, text
    code, text = invoke("cache-status", tmp_path / "nowhere")
    assert code == 2 and "nothing is there" in text, text


# -- the same rules through fsspec (the object-store code path), on its in-memory filesystem -----------
def test_object_store_half_created_cache_is_completed_and_damage_found(tmp_path, pristine, meta):
    import fsspec

    fs = fsspec.filesystem("memory")
    url, root = "memory://stillroom-test/cache", "/stillroom-test/cache"
    if fs.exists(root):
        fs.rm(root, recursive=True)
    zarr.open_group(url, mode="w-")  # a killed creator: the group without attributes
    with pytest.raises(CacheError, match="was not fully created"):
        open_cache(url)
    cache = create_or_open(url, meta)
    stored = {p.removeprefix(root + "/"): fs.cat(p) for p in fs.find(root)}
    assert stored == files(pristine, metadata_only=True)

    unit = open_cache(str(pristine)).read_block(1, 2)
    cache.write_unit(1, 2, unit, 40)
    assert fs.cat(f"{root}/values/c/1/2/0") == (pristine / "values/c/1/2/0").read_bytes()
    assert damaged_units(cache, [(1, 2)]) == {}
    fs.rm(f"{root}/indices/c/1/2/0")
    assert damaged_units(cache, [(1, 2)], verify=False) == {(1, 2): "indices/c/1/2/0 missing"}
    with pytest.raises(CacheError, match=r"views 1-1 of shard 'train-000002.tar' is damaged: indices/c/1/2/0 missing"):
        open_cache(url).read_view(1, 2)
    cache.invalidate(1, 2)
    assert not fs.exists(f"{root}/done/c/1/2/0") and open_cache(url).done_counts()[1, 2] == -1
    fs.rm(root, recursive=True)
