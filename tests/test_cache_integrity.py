"""A damaged cache never trains: every bad state, through the command a user runs.

Each case damages a copy of a finished cache (3 digits shards x 2 views in blocks of 1) the way a
disk, a sync tool or a killed job would, then runs the user's entry point on it:

* a deleted or corrupt chunk of ``values``, ``indices`` or ``logsumexp`` (the unit views 0-0 of
  shard 1): ``train-student --distillation soft`` stops with one error line naming the unit (before,
  it trained on zero-filled targets, or died with an IndexError or a zstd traceback);
  ``verify-cache`` fails naming it (before: "ok"); ``cache-status`` lists it (before: a zstd
  traceback); ``cache-teacher`` redoes it, giving back the bytes of the undamaged cache;
* a deleted array ``zarr.json``: readers name the array; ``cache-teacher`` restores it (before: "4/4
  done", "4 skipped", then ``KeyError: 'values'`` in training);
* the marker's checksum is recomputed here from plain zarr, as ``docs/cache-format.md`` describes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from conftest import TINY_STUDENT, cache_cli_args, tiny_cache_config
from typer.testing import CliRunner

from cli.main import app
from pipeline.cache import ARRAYS, UnitData, missing_objects, open_cache
from pipeline.phase1.cache_teacher import run

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = {"views": 2, "view_block": 1, "batch_size": 20}  # 6 units: 2 blocks x 3 shards
UNIT = "views 0-0 of shard 'train-000001.tar'"  # the damaged unit: block 0, shard 1
DAMAGE = [(kind, array) for kind in ("deleted", "corrupt") for array in ("values", "indices", "logsumexp")]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, digits_shards, tiny_teacher) -> Path:
    out = tmp_path_factory.mktemp("pristine") / "cache"
    assert run(tiny_cache_config(digits_shards, tiny_teacher, out, **SETTINGS))["units_done"] == 6
    return out


def files(out: Path) -> dict[str, bytes]:
    """Every stored object's bytes (zarr's in-flight temp files excluded)."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and not p.name.endswith(".partial")
    }


def damaged_copy(pristine: Path, tmp_path: Path, kind: str, array: str) -> Path:
    out = tmp_path / "cache"
    shutil.copytree(pristine, out)
    chunk = out / array / "c" / "0" / "1" / "0"  # block 0, shard 1
    if kind == "deleted":
        chunk.unlink()
    else:  # one flipped byte, as a bad disk or a torn copy would leave
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0xFF
        chunk.write_bytes(bytes(data))
    return out


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def assert_one_error_line(code: int, text: str, *needles: str) -> str:
    """Exit 2 with one ``error:`` line holding every needle, and no traceback."""
    assert code == 2, text
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, text
    assert "Traceback" not in text and "IndexError" not in text, text
    for needle in needles:
        assert needle in errors[0], text
    return errors[0]


def train_student(cache: Path, shards: str, tmp_path: Path, workers: int = 0) -> tuple[int, str]:
    """``train-student --distillation soft`` on shard 1 only (so the damaged unit is surely read)."""
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"model_kwargs": TINY_STUDENT, "model": "deit_tiny_distilled_patch16_224"}))
    shard1 = shards.replace("{000000..000002}", "000001")
    return invoke(
        "train-student",
        "--config",
        config,
        "--shards",
        shard1,
        "--cache",
        cache,
        "--distillation",
        "soft",
        "--tau",
        "3",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--max-steps-per-epoch",
        "2",
        "--warmup-epochs",
        "0",
        "--workers",
        str(workers),
        "--eval-every",
        "0",
        "--progress",
        "off",
        "--out",
        tmp_path / "run",
    )


def verify_cache(cache: Path, shards: str, teacher: str) -> tuple[int, str]:
    return invoke("verify-cache", cache, "--shards", shards, "--teacher-checkpoint", teacher, "--samples", "8")


def cache_teacher(cache: Path, shards: str, teacher: str, *extra: str) -> tuple[int, str]:
    settings = {**SETTINGS, "workers": None}
    return invoke(*cache_cli_args(shards, teacher, cache, **settings), *extra)


# -- a damaged chunk, through each command ----------------------------------------------------------
def test_undamaged_cache_trains_verifies_and_is_complete(tmp_path, pristine, digits_shards, tiny_teacher):
    """The control: the same commands pass on the pristine cache, and every unit's objects are stored."""
    assert missing_objects(open_cache(str(pristine)), [(b, s) for b in range(2) for s in range(3)]) == {}
    code, text = train_student(pristine, digits_shards, tmp_path)
    assert code == 0, text
    code, text = verify_cache(pristine, digits_shards, tiny_teacher)
    assert code == 0, text


@pytest.mark.parametrize("kind, array", DAMAGE)
def test_damaged_chunk_stops_train_student(tmp_path, pristine, digits_shards, kind, array):
    cache = damaged_copy(pristine, tmp_path, kind, array)
    code, text = train_student(cache, digits_shards, tmp_path)
    line = assert_one_error_line(code, text, UNIT, "damaged", "cache-teacher")
    if kind == "deleted":  # found by a listing before any training step
        assert f"{array}/c/0/1/0 missing" in line
    else:
        assert f"its {array!r} chunk does not decode" in line


def test_damage_met_in_a_loader_worker_is_one_error_line(tmp_path, pristine, digits_shards):
    """A DataLoader worker re-raises the error wrapped in its traceback text; the CLI keeps the message."""
    cache = damaged_copy(pristine, tmp_path, "corrupt", "logsumexp")
    code, text = train_student(cache, digits_shards, tmp_path, workers=1)
    assert_one_error_line(code, text, UNIT, "its 'logsumexp' chunk does not decode")
    assert "DataLoader worker" not in text


@pytest.mark.parametrize("kind, array", DAMAGE)
def test_damaged_chunk_fails_verify_cache(tmp_path, pristine, digits_shards, tiny_teacher, kind, array):
    cache = damaged_copy(pristine, tmp_path, kind, array)
    code, text = verify_cache(cache, digits_shards, tiny_teacher)
    assert code == 1, text
    report = json.loads(text[text.index("{") :])
    assert not report["ok"] and report["units_damaged"] == 1 and report["units_verified"] == 5
    assert any(p.startswith(f"{UNIT} is damaged") for p in report["problems"]), report["problems"]


@pytest.mark.parametrize("kind, array", DAMAGE)
def test_damaged_chunk_is_listed_by_cache_status(tmp_path, pristine, kind, array):
    cache = damaged_copy(pristine, tmp_path, kind, array)
    code, text = invoke("cache-status", cache)
    assert code == 0, text
    status = json.loads(text)
    assert status["units_done"] == 5 and status["units_damaged"] == 1 and status["missing_units"] == []
    [unit] = status["damaged_units"]
    assert (unit["views"], unit["shard"]) == ("0-0", "train-000001.tar")
    assert array in unit["why"]
    assert status["by_view_block"] == {"0-0": "2/3", "1-1": "3/3"}


@pytest.mark.parametrize("kind, array", DAMAGE)
def test_damaged_chunk_is_redone_by_cache_teacher(tmp_path, pristine, digits_shards, tiny_teacher, kind, array):
    cache = damaged_copy(pristine, tmp_path, kind, array)
    code, text = cache_teacher(cache, digits_shards, tiny_teacher)
    assert code == 0, text
    assert "cache-teacher: 1 units done, 5 skipped (already done), 1 damaged units redone" in text, text
    assert f"{UNIT} is damaged" in text and "redoing it" in text, "the log names the unit"
    assert files(cache) == files(pristine), "the redone unit must give back the undamaged bytes"


def test_corrupt_chunk_kept_with_no_verify_done_is_still_caught_when_read(
    tmp_path, pristine, digits_shards, tiny_teacher
):
    """``--no-verify-done`` only lists objects: a present but corrupt chunk is skipped there, and
    still stops training by name; the default run then redoes it."""
    cache = damaged_copy(pristine, tmp_path, "corrupt", "values")
    code, text = cache_teacher(cache, digits_shards, tiny_teacher, "--no-verify-done")
    assert code == 0 and "0 units done, 6 skipped" in text, text
    assert_one_error_line(*train_student(cache, digits_shards, tmp_path), UNIT)
    code, text = cache_teacher(cache, digits_shards, tiny_teacher)
    assert code == 0 and "1 units done, 5 skipped" in text, text
    assert files(cache) == files(pristine)


def test_a_chunk_from_another_unit_is_damage(tmp_path, pristine):
    """A chunk copied over another unit's (a bad sync) decodes fine; the checksum still names the unit."""
    cache = tmp_path / "cache"
    shutil.copytree(pristine, cache)
    shutil.copy(cache / "values" / "c" / "1" / "1" / "0", cache / "values" / "c" / "0" / "1" / "0")
    status = json.loads(invoke("cache-status", cache)[1])
    assert [(u["views"], u["shard"]) for u in status["damaged_units"]] == [("0-0", "train-000001.tar")]
    assert "do not match the checksum" in status["damaged_units"][0]["why"]


# -- a deleted array zarr.json ------------------------------------------------------------------------
def test_deleted_array_metadata_is_named_by_every_reader(tmp_path, pristine, digits_shards, tiny_teacher):
    cache = tmp_path / "cache"
    shutil.copytree(pristine, cache)
    (cache / "values" / "zarr.json").unlink()
    needles = ("array 'values' has no metadata", "values/zarr.json is missing", "cache-teacher")
    assert_one_error_line(*train_student(cache, digits_shards, tmp_path), *needles)
    assert_one_error_line(*invoke("cache-status", cache), *needles)
    assert_one_error_line(*verify_cache(cache, digits_shards, tiny_teacher), *needles)


@pytest.mark.parametrize("array", ARRAYS)
def test_deleted_array_metadata_is_restored_by_cache_teacher(tmp_path, pristine, digits_shards, tiny_teacher, array):
    cache = tmp_path / "cache"
    shutil.copytree(pristine, cache)
    (cache / array / "zarr.json").unlink()
    code, text = cache_teacher(cache, digits_shards, tiny_teacher)
    assert code == 0 and "0 units done, 6 skipped" in text, text
    assert f"array {array!r} had no metadata; restoring it" in text
    assert files(cache) == files(pristine)


# -- the format: checksums a reader can recompute -------------------------------------------------------
def documented_checksum(fingerprint: str, block: int, shard: int, count: int, arrays: dict[str, np.ndarray]) -> int:
    """The unit checksum exactly as docs/cache-format.md spells it (no stillroom code)."""
    h = hashlib.blake2b(digest_size=8, person=b"stillroom-unit")
    h.update(fingerprint.encode("ascii"))
    h.update(struct.pack("<qqq", block, shard, count))
    for name in ("values", "indices", "logsumexp", "pixel_digests", "labels", "digests"):
        h.update(np.ascontiguousarray(arrays[name]).astype(arrays[name].dtype.newbyteorder("<")).tobytes())
    for key in arrays["keys"].tolist():
        data = key.encode("utf-8")
        h.update(struct.pack("<I", len(data)) + data)
    return int.from_bytes(h.digest(), "little")


def test_markers_hold_count_and_a_checksum_a_plain_zarr_reader_can_recompute(pristine):
    g = zarr.open_group(str(pristine), mode="r")
    meta = g.attrs["stillroom"]
    assert meta["format_version"] == 4
    cap, fingerprint = meta["capacity"], meta["fingerprint"]
    done = np.asarray(g["done"][...])
    assert done.dtype == np.int64 and done.shape == (2, 3, 3)
    for b in range(2):
        for s in range(3):
            rows = slice(s * cap, (s + 1) * cap)
            per_view = ("values", "indices", "logsumexp", "pixel_digests")
            arrays = {name: np.asarray(g[name][b : b + 1, rows]) for name in per_view}
            arrays.update({name: np.asarray(g[name][rows]) for name in ("labels", "keys", "digests")})
            count, checksum = done[b, s, 0], int(done[b, s, 1:2].view(np.uint64)[0])
            writer = int(done[b, s, 2:3].view(np.uint64)[0])
            assert count == 40 and writer == int(fingerprint[:16], 16)
            assert checksum == documented_checksum(fingerprint, b, s, int(count), arrays)
    for name in ARRAYS:  # a corrupt chunk fails to decode: zstd's frame checksum, or a CRC32C after blosc
        codecs = json.loads((pristine / name / "zarr.json").read_text())["codecs"]
        zstd = any(c["name"] == "zstd" and c["configuration"]["checksum"] for c in codecs)
        assert zstd or codecs[-1]["name"] == "crc32c", (name, codecs)


def test_digests_are_stored_read_and_covered_by_the_checksum(tmp_path, pristine):
    """The per-row image digests: written with labels/keys, returned by read_view, checksummed."""
    cache_dir = tmp_path / "cache"
    shutil.copytree(pristine, cache_dir)
    cache = open_cache(str(cache_dir), mode="r+")
    assert (cache.read_view(1, 2).digests[:40] != 0).all(), "phase 1 records every sample's digest"
    units = [cache.read_block(b, 2) for b in range(2)]
    digests = np.arange(1, 41, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    for b, unit in enumerate(units):
        unit.digests[:40] = digests
        cache.write_unit(b, 2, unit, 40)
    view = open_cache(str(cache_dir)).read_view(1, 2)
    assert view.digests.dtype == np.uint64 and view.digests[:40].tolist() == digests.tolist()
    assert UnitData.empty(cache.meta, 0).digests.tolist() == [0] * 40
    g = zarr.open_group(str(cache_dir), mode="r+")
    g["digests"][81] = 7  # row 1 of shard 2, behind the cache's back
    status = json.loads(invoke("cache-status", cache_dir)[1])
    assert {(u["views"], u["shard"]) for u in status["damaged_units"]} == {
        ("0-0", "train-000002.tar"),
        ("1-1", "train-000002.tar"),
    }


def test_corrupt_marker_is_a_damaged_unit_and_is_redone(tmp_path, pristine, digits_shards, tiny_teacher):
    """A marker object that does not decode claims its unit: the unit is reported damaged (not silently
    missing), and cache-teacher redoes it."""
    cache = damaged_copy(pristine, tmp_path, "corrupt", "done")
    code, text = invoke("cache-status", cache)
    assert code == 0, text
    status = json.loads(text[text.index("{") :])
    assert [(u["views"], u["shard"]) for u in status["damaged_units"]] == [("0-0", "train-000001.tar")], status
    assert status["units_done"] == 5 and status["missing_units"] == []
    code, text = cache_teacher(cache, digits_shards, tiny_teacher)
    assert code == 0 and "1 units done, 5 skipped" in text, text
    assert files(cache) == files(pristine)


def test_the_documented_reader_reads_a_cache_without_stillroom(pristine):
    """docs/cache-format.md's code (verify a unit, recompute the fingerprints, rebuild soft targets) runs on a
    real cache and gives stillroom's own soft targets."""
    import re

    import torch

    from pipeline.models.targets import soft_target_probs

    doc = (Path(__file__).resolve().parents[1] / "docs" / "cache-format.md").read_text()
    verify_unit, read_it = re.findall(r"```python\n(.*?)```", doc, re.S)
    code = read_it.replace('"cache.zarr"', repr(str(pristine)))
    ns: dict = {}
    exec(verify_unit + "\n" + code.replace("v = 3", "v = 1"), ns)
    unit, i, ok = ns["unit"], ns["i"], ns["ok"]
    values, indices = (
        torch.from_numpy(unit[k][i][ok].astype(dt)) for k, dt in (("values", np.float32), ("indices", np.int64))
    )
    lse = torch.from_numpy(unit["logsumexp"][i][ok])
    ours = soft_target_probs(values, indices, lse[:, 0], lse[:, 1], 1.0, 3.0, ns["C"]).numpy()
    assert np.abs(ours - ns["probs"]).max() < 1e-6
