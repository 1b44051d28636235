"""Phase 1 (``cache-teacher``): what the cache holds, checked without the cache code where it matters.

* The stored top-k/logsumexp equal a reference computed here from the raw tar bytes with PIL,
  torchvision and timm (eval recipe, so the reference does not need view replay).
* The cache is a plain zarr v3 group with the dtypes, shapes, chunks and attributes of DESIGN.md.
* Refusals (other teacher weights, --topk > classes, a missing shard) name what is wrong.
* ``verify-cache`` passes a good cache and fails a tampered one; ``cache-status`` reports a
  partial cache; each image is decoded once per unit, not once per view.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import shutil
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import zarr
from conftest import cache_cli_args, tiny_cache_config
from PIL import Image
from torchvision import transforms as T
from typer.testing import CliRunner

import pipeline.shards.decode
from cli.main import app
from pipeline.cache import ARRAYS, open_cache
from pipeline.options import CacheConfig
from pipeline.phase1.cache_teacher import run

pytestmark = pytest.mark.usefixtures("one_thread")

K = 5
TEMPS = [1.0, 2.0, 4.0]


def _cfg(shards: str, teacher: str, out: Path, **kw) -> CacheConfig:
    return tiny_cache_config(shards, teacher, out, **{"views": 4, "view_block": 2, "topk": K, "batch_size": 16, **kw})


def _cache_cli_args(shards: str, teacher: str, out: Path, *extra: str) -> list[str]:
    """CLI flags equal to ``_cfg`` defaults (so the fingerprint matches ``deit_cache``)."""
    return [*cache_cli_args(shards, teacher, out, views=4, view_block=2, topk=K, batch_size=16), *extra]


def _output(result) -> str:
    """stdout and stderr of a CliRunner result (click >= 8.2 interleaves both in ``output``)."""
    return result.output


@pytest.fixture(scope="module")
def eval_cache(tmp_path_factory, digits_shards, tiny_teacher) -> Path:
    out = tmp_path_factory.mktemp("eval-cache") / "cache"
    run(_cfg(digits_shards, tiny_teacher, out, recipe="eval", views=2, view_block=2, temperatures=TEMPS))
    return out


@pytest.fixture(scope="module")
def deit_cache(tmp_path_factory, digits_shards, tiny_teacher) -> Path:
    """DeiT recipe at 32 px: 3 shards x 40 digits, V=4 in blocks of 2, K=5, tau in {1, 3}."""
    out = tmp_path_factory.mktemp("deit-cache") / "cache"
    summary = run(_cfg(digits_shards, tiny_teacher, out))
    assert summary["units_done"] == 6 and summary["views"] == 120 * 4
    return out


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory) -> str:
    """Same architecture as ``tiny_teacher``, different weights."""
    torch.manual_seed(1)
    model = timm.create_model("regnetx_002", num_classes=10)
    path = tmp_path_factory.mktemp("teacher2") / "regnetx_002-other.pth"
    torch.save(model.state_dict(), path)
    return str(path)


def _read_tar(path: Path) -> list[tuple[str, bytes, int]]:
    """(key, image bytes, label) in tar order, using only tarfile."""
    samples: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            if key not in samples:
                samples[key] = {}
                order.append(key)
            samples[key][ext] = tar.extractfile(m).read()
    return [(k, samples[k]["png"], int(samples[k]["cls"])) for k in order]


def _arrays(path: Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(g[name][...]) for name in ARRAYS}


# ---------------------------------------------------------------------------------------------
# 1. Stored targets equal an independent reference


def test_eval_cache_matches_independent_teacher_run(eval_cache, digits_shards, tiny_teacher):
    g = zarr.open_group(str(eval_cache), mode="r")
    meta = g.attrs["stillroom"]
    shard_dir = Path(digits_shards).parent
    tars = sorted(shard_dir.glob("train-*.tar"))
    assert [s["name"] for s in meta["shards"]] == [t.name for t in tars]
    cap = int(meta["capacity"])

    # The reference: PIL decode, torchvision resize + center crop, timm model, its own mean/std.
    model = timm.create_model("regnetx_002", num_classes=10)
    model.load_state_dict(torch.load(tiny_teacher, map_location="cpu", weights_only=True))
    model.eval()
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    tf = T.Compose(
        [
            T.Resize(math.floor(32 / 0.875), interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(32),
            T.ToTensor(),
            T.Lambda(lambda x: x.half().float()),  # the documented model input: float32(float16(k / 255))
            T.Normalize(mean, std),
        ]
    )
    rows, keys, labels, pixels = [], [], [], []
    for s, tar in enumerate(tars):
        for pos, (key, data, label) in enumerate(_read_tar(tar)):
            rows.append(s * cap + pos)
            keys.append(key)
            labels.append(label)
            pixels.append(tf(Image.open(io.BytesIO(data)).convert("RGB")))
    with torch.no_grad():
        logits = model(torch.stack(pixels)).float()
    ref_vals, ref_idx = torch.topk(logits, K, dim=-1)
    rows_np = np.array(rows)

    assert np.asarray(g["keys"][...])[rows_np].tolist() == keys
    assert np.asarray(g["labels"][...])[rows_np].tolist() == labels
    assert (np.asarray(g["done"][..., 0]) == 40).all()
    for v in range(2):  # the eval recipe has no randomness: both views hold the same targets
        values = torch.from_numpy(np.asarray(g["values"][v])[rows_np].astype(np.float32))
        indices = torch.from_numpy(np.asarray(g["indices"][v])[rows_np].astype(np.int64))
        lse = torch.from_numpy(np.asarray(g["logsumexp"][v])[rows_np])
        # Top-k values: fp16 log-probabilities at the first temperature (1) of the reference (tolerance:
        # fp16 rounding of a float32 that may differ in the last bits with batch composition).
        ref_logp = ref_vals - torch.logsumexp(logits, dim=-1, keepdim=True)
        torch.testing.assert_close(values, ref_logp.half().float(), rtol=2e-3, atol=2e-4)
        assert torch.equal(indices, ref_idx)
        assert (values[:, :-1] >= values[:, 1:]).all(), "values must be sorted descending"
        for t_i, tau in enumerate(TEMPS):
            torch.testing.assert_close(lse[:, t_i], torch.logsumexp(logits / tau, dim=-1), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 5. Plain zarr reads the cache: dtypes, shapes, chunks, attributes


def test_cache_is_plain_zarr_with_design_layout(deit_cache, digits_shards, tiny_teacher):
    g = zarr.open_group(str(deit_cache), mode="r")
    assert g.metadata.zarr_format == 3
    meta = g.attrs["stillroom"]
    v, cap, nshards, rows = 4, 40, 3, 120
    expect = {
        "values": (np.float16, (v, rows, K), (2, cap, K)),
        "indices": (np.int16, (v, rows, K), (2, cap, K)),
        "logsumexp": (np.float32, (v, rows, 2), (2, cap, 2)),
        "labels": (np.int32, (rows,), (cap,)),
        "digests": (np.uint64, (rows,), (cap,)),
        "pixel_digests": (np.uint32, (v, rows, 1), (2, cap, 1)),
        "done": (np.int64, (2, nshards, 3), (1, 1, 3)),
    }
    for name, (dtype, shape, chunks) in expect.items():
        arr = g[name]
        assert arr.dtype == dtype, name
        assert arr.shape == shape, name
        assert arr.chunks == chunks, name
    keys = g["keys"]
    assert keys.shape == (rows,) and keys.chunks == (cap,)
    key_values = np.asarray(keys[...])
    assert key_values.dtype.kind in ("T", "U", "O") and all(isinstance(k, str) for k in key_values.tolist())
    assert all(re.fullmatch(r"digits-\d{5}", k) for k in key_values.tolist())
    assert sorted(set(key_values.tolist())) == sorted(key_values.tolist()), "keys are unique"
    labels = np.asarray(g["labels"][...])
    assert ((labels >= 0) & (labels < 10)).all()
    assert (np.asarray(g["done"][..., 0]) == 40).all()
    # Each row's digest is a 63-bit BLAKE2b of the sample's stored image bytes (0 would mean unknown).
    expected = {}
    for tar in sorted(Path(digits_shards).parent.glob("train-*.tar")):
        for key, data, _ in _read_tar(tar):
            h = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & ((1 << 63) - 1)
            expected[key] = h or 1
    stored = dict(zip(key_values.tolist(), np.asarray(g["digests"][...]).tolist(), strict=True))
    assert stored == expected
    values = np.asarray(g["values"][...]).astype(np.float32)
    assert (np.diff(values, axis=-1) <= 0).all(), "top-k values sorted descending"
    indices = np.asarray(g["indices"][...])
    assert ((indices >= 0) & (indices < 10)).all()
    assert all(len(set(row)) == K for row in indices.reshape(-1, K).tolist()), "distinct classes per row"
    # values are log-probabilities at tau 1: at most 0, and the largest logit / 3 is logp + lse_1 over 3
    lse = np.asarray(g["logsumexp"][...])
    assert (values <= 1e-3).all()
    assert (lse[..., 1] >= (values[..., 0] + lse[..., 0]) / 3.0 - 1e-3).all()
    # The rows holding a digest of their replayed pixels (never 0) rotate with the view: with 4 views (fewer than
    # 16), each view checks 1 row in 4, and every image is checked in exactly one of its 4 views.
    checked = np.asarray(g["pixel_digests"][...])[..., 0] != 0  # [views, rows]
    assert (checked.sum(axis=0) == 1).all() and (checked.mean(axis=1) == 0.25).all()

    assert meta["format_version"] == 4
    assert meta["topk"] == K and meta["temperatures"] == [1.0, 3.0]
    assert meta["views"] == 4 and meta["view_block"] == 2 and meta["seed"] == 0 and meta["capacity"] == cap
    assert [(s["name"], s["count"]) for s in meta["shards"]] == [(f"train-{i:06d}.tar", 40) for i in range(3)]
    assert all(Path(s["url"]).exists() for s in meta["shards"])
    assert meta["recipe"]["name"] == "deit" and meta["recipe"]["img_size"] == 32
    teacher = meta["teacher"]
    assert teacher["name"] == "regnetx_002"
    assert teacher["checkpoint_sha256"] == hashlib.sha256(Path(tiny_teacher).read_bytes()).hexdigest()
    assert teacher["input_size"] == 32
    assert teacher["mean"] == [0.485, 0.456, 0.406] and teacher["std"] == [0.229, 0.224, 0.225]
    assert {"torch", "torchvision", "timm", "Pillow"} <= set(meta["versions"])
    assert re.fullmatch(r"[0-9a-f]{64}", meta["fingerprint"])


# ---------------------------------------------------------------------------------------------
# 3. Refusals


def test_other_teacher_weights_refused_then_force_new_replaces(
    tmp_path, deit_cache, digits_shards, tiny_teacher, other_teacher
):
    out = tmp_path / "cache"
    shutil.copytree(deit_cache, out)
    before = zarr.open_group(str(out), mode="r").attrs["stillroom"]
    runner = CliRunner()

    same = runner.invoke(app, _cache_cli_args(digits_shards, tiny_teacher, out))
    assert same.exit_code == 0, _output(same)
    assert "0 units done, 6 skipped" in _output(same)

    refused = runner.invoke(app, _cache_cli_args(digits_shards, other_teacher, out))
    assert refused.exit_code == 2, _output(refused)
    assert "teacher.checkpoint_sha256" in _output(refused)
    assert "--force-new" in _output(refused)
    assert zarr.open_group(str(out), mode="r").attrs["stillroom"] == before, "a refused run must not touch the cache"

    # --force-new replaces it (only views 0-1 computed, to keep the test short)
    replaced = runner.invoke(
        app, _cache_cli_args(digits_shards, other_teacher, out, "--force-new", "--view-range", "0:2")
    )
    assert replaced.exit_code == 0, _output(replaced)
    g = zarr.open_group(str(out), mode="r")
    meta = g.attrs["stillroom"]
    assert meta["teacher"]["checkpoint_sha256"] == hashlib.sha256(Path(other_teacher).read_bytes()).hexdigest()
    assert meta["fingerprint"] != before["fingerprint"]
    assert np.asarray(g["done"][..., 0]).tolist() == [[40, 40, 40], [-1, -1, -1]]
    old = zarr.open_group(str(deit_cache), mode="r")
    assert not np.array_equal(np.asarray(g["values"][0:2]), np.asarray(old["values"][0:2]))
    assert np.array_equal(np.asarray(g["keys"][...]), np.asarray(old["keys"][...]))


def test_topk_larger_than_classes_refused(tmp_path, digits_shards, tiny_teacher):
    out = tmp_path / "cache"
    args = _cache_cli_args(digits_shards, tiny_teacher, out)
    args[args.index("--topk") + 1] = "11"
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, _output(result)
    assert "--topk 11" in _output(result) and "10" in _output(result)
    assert not out.exists()


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--view-block", "0", "--view-block must be >= 1"),
        ("--views", "0", "--views must be >= 1"),
        ("--topk", "0", "--topk must be >= 1"),
        ("--temperatures", "1,0", "--temperatures must be"),
    ],
)
def test_nonsense_options_refused(tmp_path, digits_shards, tiny_teacher, flag, value, message):
    out = tmp_path / "cache"
    args = _cache_cli_args(digits_shards, tiny_teacher, out)
    args[args.index(flag) + 1] = value
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, _output(result)
    assert message in _output(result)
    assert not out.exists()


def test_missing_shard_refused_before_any_work(tmp_path, digits_shards, tiny_teacher):
    # A shard that is nowhere (no sidecar either)
    out = tmp_path / "cache"
    missing = str(tmp_path / "nowhere" / "train-000000.tar")
    result = CliRunner().invoke(app, _cache_cli_args(missing, tiny_teacher, out))
    assert result.exit_code == 2, _output(result)
    assert "train-000000.tar" in _output(result) and "does not exist" in _output(result)
    assert not out.exists()

    # A shard listed in the pack sidecar whose tar was deleted: refused up front, naming it
    data = tmp_path / "data"
    shutil.copytree(Path(digits_shards).parent, data)
    (data / "train-000001.tar").unlink()
    result = CliRunner().invoke(app, _cache_cli_args(str(data / "train-{000000..000002}.tar"), tiny_teacher, out))
    assert result.exit_code == 2, _output(result)
    assert "train-000001.tar" in _output(result) and "does not exist" in _output(result)
    assert not out.exists(), "the cache must not be created for a shard list that cannot be read"


# ---------------------------------------------------------------------------------------------
# 4. verify-cache


def _verify(cache: Path, shards: str, teacher: str):
    return CliRunner().invoke(app, ["verify-cache", str(cache), "--shards", shards, "--teacher-checkpoint", teacher])


def test_verify_cache_passes_good_cache(deit_cache, digits_shards, tiny_teacher):
    result = _verify(deit_cache, digits_shards, tiny_teacher)
    assert result.exit_code == 0, _output(result)
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert report["ok"] and report["checked"] > 0 and report["top1_agreement"] == 1.0
    assert report["max_abs_value_diff"] <= 0.05


def test_verify_cache_fails_tampered_values(tmp_path, deit_cache, digits_shards, tiny_teacher):
    out = tmp_path / "cache"
    shutil.copytree(deit_cache, out)
    # Wrong targets with valid checksums (what a nondeterministic or swapped teacher would write):
    # only the live teacher can tell. Views 0-1 of shard 1: top-k still sorted, just wrong.
    cache = open_cache(str(out), mode="r+")
    unit = cache.read_block(0, 1)
    unit.values += np.float16(0.25)
    cache.write_unit(0, 1, unit, 40)
    result = _verify(out, digits_shards, tiny_teacher)
    assert result.exit_code == 1, _output(result)
    assert "max |value difference|" in _output(result)
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert report["units_damaged"] == 0 and report["units_verified"] == 6


def test_verify_cache_fails_swapped_keys(tmp_path, deit_cache, digits_shards, tiny_teacher):
    out = tmp_path / "cache"
    shutil.copytree(deit_cache, out)
    # Swapped with valid checksums (a cache built from other shards with the same names and counts):
    # only the comparison with the shards can tell. Rows 42-43 = positions 2-3 of shard 1.
    cache = open_cache(str(out), mode="r+")
    units = [cache.read_block(block, 1) for block in range(2)]  # both first: the keys chunk is the shard's
    for block, unit in enumerate(units):
        unit.keys[[2, 3]] = unit.keys[[3, 2]]
        cache.write_unit(block, 1, unit, 40)
    result = _verify(out, digits_shards, tiny_teacher)
    assert result.exit_code == 1, _output(result)
    assert "train-000001.tar" in _output(result) and "position 2" in _output(result)


# ---------------------------------------------------------------------------------------------
# 6. cache-status on a partial cache; view ranges compose into the full cache


def test_cache_status_partial_then_completed_by_view_range(tmp_path, deit_cache, digits_shards, tiny_teacher):
    out = tmp_path / "cache"
    run(_cfg(digits_shards, tiny_teacher, out, view_range="2:4"))
    result = CliRunner().invoke(app, ["cache-status", str(out)])
    assert result.exit_code == 0, _output(result)
    status = json.loads(result.stdout)
    assert status["units_done"] == 3 and status["units_total"] == 6
    assert status["by_view_block"] == {"0-1": "0/3", "2-3": "3/3"}
    assert status["missing_units"] == [{"views": "0-1", "shard": f"train-{i:06d}.tar"} for i in range(3)]
    assert status["samples_views_cached"] == 120 * 2
    assert status["bytes_on_disk"] > 0 and status["bytes_per_sample_view"] > 0
    assert 0 <= status["teacher_top1_vs_label_pct"] <= 100

    run(_cfg(digits_shards, tiny_teacher, out, view_range="0:2"))
    status = json.loads(CliRunner().invoke(app, ["cache-status", str(out)]).stdout)
    assert status["units_done"] == 6 and status["missing_units"] == []
    full, parts = _arrays(deit_cache), _arrays(out)
    for name in full:
        assert np.array_equal(full[name], parts[name]), f"{name}: two view-range runs differ from one full run"


# ---------------------------------------------------------------------------------------------
# 7. One decode per image per unit (shard x view block), whatever the number of views


@pytest.mark.parametrize("view_block, units_per_shard", [(4, 1), (2, 2)])
def test_each_image_decoded_once_per_unit(
    tmp_path, monkeypatch, digits_shards, tiny_teacher, view_block, units_per_shard
):
    calls: defaultdict[bytes, int] = defaultdict(int)
    real = pipeline.shards.decode.decode_image

    def counting(data: bytes):
        calls[hashlib.sha256(data).digest()] += 1
        return real(data)

    monkeypatch.setattr(pipeline.shards.decode, "decode_image", counting)
    summary = run(_cfg(digits_shards, tiny_teacher, tmp_path / "cache", view_block=view_block, workers=0))
    assert summary["views"] == 120 * 4
    assert len(calls) == 120, "every image decoded"
    assert set(calls.values()) == {units_per_shard}, "one decode per image per unit, not per view"
    assert summary["images"] == 120 * units_per_shard


# ---------------------------------------------------------------------------------------------
# 8. A bad sample is counted once, not once per view block


def _shard_with_a_bad_image(src: Path, out: Path, bad: int) -> Path:
    """A copy of ``src`` whose ``bad``-th sample's image bytes are garbage (the tar itself stays valid)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(src) as tin, tarfile.open(out, "w") as tout:
        members = tin.getmembers()
        bad_key = sorted({m.name.split(".", 1)[0] for m in members})[bad]
        for m in members:
            data = tin.extractfile(m).read()
            if m.name == f"{bad_key}.png":
                data = b"not an image at all"
                m.size = len(data)
            tout.addfile(m, io.BytesIO(data))
    return out


def test_bad_sample_is_counted_once_not_once_per_view_block(tmp_path, caplog, digits_shards, tiny_teacher):
    shard = _shard_with_a_bad_image(Path(digits_shards).parent / "train-000000.tar", tmp_path / "d" / "bad.tar", 5)
    cfg = _cfg(str(shard), tiny_teacher, tmp_path / "cache", views=4, view_block=1, num_classes=10, on_error="skip")
    with caplog.at_level("WARNING"):
        summary = run(cfg)
    assert summary["units_done"] == 4  # 4 view blocks of one shard, each re-reading the bad sample
    assert sum(summary["skipped_samples"].values()) == 1, summary["skipped_samples"]
    per_sample = [r for r in caplog.records if r.getMessage().startswith("skipped 1 sample(s) at shard")]
    assert len(per_sample) == 1, [r.getMessage() for r in per_sample]
    per_shard = [r for r in caplog.records if "bad sample(s) skipped" in r.getMessage()]
    assert [r.getMessage().split(": ")[0] for r in per_shard] == ["shard 'bad.tar'"]
    assert (_arrays(tmp_path / "cache")["done"][..., 0] == 39).all(), "each unit holds the 39 good samples"
