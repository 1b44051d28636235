"""Exact view replay: a view is a pure function of (image bytes, recipe, seed, view, key).

These tests protect the central invariant of the design: the pixels the student trains on are
the pixels the teacher saw. They compare replays across fresh processes, DataLoader worker counts,
re-sharded copies of the data, moved shards and polluted global RNG state, on the scikit-learn
digits (real scans) and on photo-like JPEGs made by ``tests/photos.py`` (some grayscale), and check the
mixup/cutmix pairing contract: partners in the same shard and window, one shared lambda, crossed
labels, an odd leftover unmixed, and mixed pixels that really are the mix of the two unmixed views.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import write_digits_shards
from photos import jpeg
from PIL import Image
from torch.utils.data import DataLoader

from pipeline.data import StreamSpec, ViewStream, epoch_batches
from pipeline.recipe import Recipe, make_recipe
from pipeline.replay import View, augment_view, decode_image, replay_shard
from pipeline.shards import ShardInfo, SkipStats, iter_decoded, load_shard_list

SEED = 1234
TESTS_DIR = Path(__file__).resolve().parent
# Photo-like JPEGs of photo sizes: (key, (width, height), mode); two grayscale (decoded to RGB first).
PHOTOS = [
    ("tench", (160, 120), "RGB"),
    ("cock", (120, 160), "RGB"),
    ("brambling", (200, 133), "RGB"),
    ("lizard", (96, 96), "RGB"),
    ("lumbermill", (150, 100), "L"),
    ("switch", (128, 90), "L"),
]


def no_mix(recipe: Recipe) -> Recipe:
    """The same recipe with mixing off: per-sample views only."""
    return dataclasses.replace(recipe, mixup_prob=0.0)


def tensor_digest(x: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(f"{x.dtype}{tuple(x.shape)}".encode())
    h.update(x.contiguous().numpy().tobytes())
    return h.hexdigest()


def view_digest(v: View) -> str:
    return f"{tensor_digest(v.pixels)}:{v.label}:{v.mix_label}:{v.lam!r}"


def shard_views(pattern: str, recipe: Recipe, views: list[int], seed: int = SEED) -> dict[tuple[str, int], View]:
    """All final (mixed) views of every shard in ``pattern``, by (key, view)."""
    out: dict[tuple[str, int], View] = {}
    for i, shard in enumerate(load_shard_list(pattern)):
        for window in replay_shard(iter_decoded(shard, i, 10), views, recipe, seed, shard.name):
            for v in window:
                assert (v.key, v.view) not in out
                out[v.key, v.view] = v
    return out


def replay_digests(spec: dict) -> dict[str, str]:
    """Digests of digits shard views (mixing on) and of photo views (per sample).

    Runs in the test process and, unchanged, in fresh interpreters
    (``test_replay_is_identical_in_fresh_processes``).
    """
    out = {}
    deit = make_recipe("deit", img_size=32)
    for (key, view), v in shard_views(spec["pattern"], deit, spec["views"]).items():
        out[f"digits/{key}/{view}"] = view_digest(v)
    big = make_recipe("deit", img_size=64)
    for path in spec["files"]:
        with open(path, "rb") as f:
            img = decode_image(f.read())
        key = Path(path).stem
        for view in spec["views"]:
            out[f"photo/{key}/{view}"] = tensor_digest(augment_view(img, big, SEED, view, key))
    return out


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The ``PHOTOS`` written as JPEG files, by key (file stem)."""
    folder = tmp_path_factory.mktemp("photos")
    files = {}
    for i, (key, size, mode) in enumerate(PHOTOS):
        files[key] = folder / f"{key}.jpg"
        files[key].write_bytes(jpeg(i, size, mode))
    return files


@pytest.fixture(scope="module")
def photos(photo_files: dict[str, Path]) -> dict[str, Image.Image]:
    """Decoded photo-like images by key."""
    return {key: decode_image(path.read_bytes()) for key, path in photo_files.items()}


@pytest.fixture(scope="module")
def photo_shard(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One shard of 31 textured photo-like JPEGs (so cutmix boxes are visible), odd count on purpose."""
    out = tmp_path_factory.mktemp("photos-shard") / "photos-000000.tar"
    with wds.TarWriter(str(out)) as sink:
        for i in range(31):
            size = (64 + 9 * (i % 6), 48 + 7 * (i % 5))
            sink.write({"__key__": f"photo{i:03d}", "jpg": jpeg(100 + i, size), "cls": b"%d" % (i % 10)})
    return str(out)


# ---------------------------------------------------------------------------------------------
# Determinism of one view


def test_same_identity_gives_identical_tensor(photo_files, digits_shards):
    """Decoding the same bytes again and replaying the same (seed, view, key) is bit-identical."""
    recipe = make_recipe("deit", img_size=64)
    for key, path in photo_files.items():
        data = path.read_bytes()
        for view in (0, 5):
            a = augment_view(decode_image(data), recipe, SEED, view, key)
            b = augment_view(decode_image(data), recipe, SEED, view, key)
            assert a.shape == (3, 64, 64) and a.dtype == torch.float32
            assert torch.equal(a, b), (key, view)
    first = shard_views(digits_shards, make_recipe("deit", img_size=32), [0, 1])
    again = shard_views(digits_shards, make_recipe("deit", img_size=32), [0, 1])
    assert first.keys() == again.keys() and len(first) == 240
    for k, v in first.items():
        w = again[k]
        assert torch.equal(v.pixels, w.pixels) and (v.label, v.mix_label, v.lam) == (w.label, w.mix_label, w.lam), k


def test_views_and_keys_and_seeds_differ(photos):
    """Different views, keys or cache seeds of the same bytes give different pixels."""
    recipe = make_recipe("deit", img_size=64)
    for key, img in photos.items():
        views = [augment_view(img, recipe, SEED, v, key) for v in range(4)]
        for i in range(len(views)):
            for j in range(i + 1, len(views)):
                assert not torch.equal(views[i], views[j]), (key, i, j)
        assert not torch.equal(views[0], augment_view(img, recipe, SEED, 0, key + "-other"))
        assert not torch.equal(views[0], augment_view(img, recipe, SEED + 1, 0, key))


def test_eval_recipe_is_deterministic_center_crop(photos):
    """The eval recipe has no randomness: every view and key give the same centre crop."""
    recipe = make_recipe("eval", img_size=48)
    for key, img in photos.items():
        a = augment_view(img, recipe, SEED, 0, key)
        assert a.shape == (3, 48, 48)
        assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
        assert torch.equal(a, augment_view(img, recipe, SEED + 1, 3, "another-key"))


def test_replay_is_identical_in_fresh_processes(digits_shards, photo_files):
    """Two fresh interpreters (different hash salts and thread counts) and this process agree bit for bit."""
    spec = {
        "pattern": digits_shards,
        "files": [str(p) for p in photo_files.values()],
        "views": [0, 1, 7],
    }
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2]); "
        "import test_replay; print('DIGESTS=' + json.dumps(test_replay.replay_digests(json.loads(sys.argv[3]))))"
    )
    procs = []
    for salt, threads in (("1", "1"), ("2", "2")):
        env = {**os.environ, "PYTHONHASHSEED": salt, "OMP_NUM_THREADS": threads}
        args = [sys.executable, "-c", code, str(TESTS_DIR.parent), str(TESTS_DIR), json.dumps(spec)]
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    here = replay_digests(spec)
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr[-3000:]
        line = next(s for s in stdout.splitlines() if s.startswith("DIGESTS="))
        results.append(json.loads(line.removeprefix("DIGESTS=")))
    assert len(here) == 120 * 3 + len(PHOTOS) * 3
    for other in results:
        assert other.keys() == here.keys()
        diff = [k for k in here if here[k] != other[k]]
        assert not diff, f"{len(diff)} views differ across processes, e.g. {diff[:3]}"


def _spec(pattern: str, recipe: Recipe, view: int) -> StreamSpec:
    """Every shard of ``pattern`` at one view, with no cache (the trainer's data path alone)."""
    shards = load_shard_list(pattern)
    return StreamSpec(
        shards=shards,
        shard_ids=list(range(len(shards))),
        cache_rows=None,
        cache_url=None,
        view=view,
        recipe=recipe,
        seed=SEED,
        num_classes=10,
    )


def _stream_views(pattern: str, recipe: Recipe, view: int, workers: int) -> dict[str, tuple]:
    spec = _spec(pattern, recipe, view)
    loader = DataLoader(ViewStream(spec, chunk=16), batch_size=None, num_workers=workers)
    out = {}
    for batch in loader:
        for i, key in enumerate(batch["keys"]):
            assert key not in out
            out[key] = (batch["pixels"][i], int(batch["label"][i]), int(batch["mix_label"][i]), float(batch["lam"][i]))
    return out


@pytest.mark.parametrize("view", [0, 3])
def test_dataloader_workers_do_not_change_views(digits_shards, view):
    """0 or 2 DataLoader workers (and shuffled batching) yield the same mixed views per key."""
    recipe = make_recipe("deit", img_size=32)
    serial = _stream_views(digits_shards, recipe, view, workers=0)
    parallel = _stream_views(digits_shards, recipe, view, workers=2)
    assert len(serial) == 120 and serial.keys() == parallel.keys()
    for key, (px, label, mix_label, lam) in serial.items():
        px2, label2, mix_label2, lam2 = parallel[key]
        assert torch.equal(px, px2) and (label, mix_label, lam) == (label2, mix_label2, lam2), key
    # The same views reach the trainer through shuffled, exact-size batches, whatever the worker count.
    spec = _spec(digits_shards, recipe, view)
    for workers in (0, 2):
        seen = set()
        for batch in epoch_batches(spec, batch_size=8, workers=workers, shuffle_buffer=24, seed=workers):
            assert batch["pixels"].shape == (8, 3, 32, 32)
            for i, key in enumerate(batch["keys"]):
                assert torch.equal(batch["pixels"][i], serial[key][0]), (workers, key)
                assert float(batch["lam"][i]) == serial[key][3]
                seen.add(key)
        assert seen == set(serial)


def test_resharding_keeps_per_sample_views(tmp_path, digits_shards):
    """The same 120 digits packed as 3 x 40 or 5 x 24 shards keep every per-sample (pre-mix) view."""
    other = write_digits_shards(tmp_path, 120, 24, prefix="reshard")
    assert len(load_shard_list(other)) == 5
    for recipe in (no_mix(make_recipe("deit", img_size=32)), make_recipe("eval", img_size=32)):
        a = shard_views(digits_shards, recipe, [0, 2])
        b = shard_views(other, recipe, [0, 2])
        assert a.keys() == b.keys() and len(a) == 240
        for k, v in a.items():
            assert v.lam == 1.0 and v.mix_label == v.label
            assert torch.equal(v.pixels, b[k].pixels), k


def test_shard_index_and_location_do_not_change_mixed_views(tmp_path, digits_shards):
    """Listing shards in another order, or moving them to another folder, keeps the mixed views.

    Mixing partners depend on the shard's name only; its place in the list and its directory are not
    part of a view's identity.
    """
    recipe = make_recipe("deit", img_size=32)
    base = shard_views(digits_shards, recipe, [1])
    src = Path(digits_shards).parent
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in src.iterdir():
        shutil.copy(f, moved / f.name)
    urls = [str(moved / s.name) for s in load_shard_list(digits_shards)][::-1]
    again = {}
    for i, shard in enumerate(load_shard_list(urls)):
        for window in replay_shard(iter_decoded(shard, i, 10), [1], recipe, SEED, shard.name):
            for v in window:
                again[v.key, v.view] = v
    assert base.keys() == again.keys()
    for k, v in base.items():
        assert torch.equal(v.pixels, again[k].pixels) and (v.mix_label, v.lam) == (again[k].mix_label, again[k].lam)


def _rng_states():
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _states_equal(a, b) -> bool:
    np_a, np_b = a[1], b[1]
    same_np = np_a[0] == np_b[0] and np.array_equal(np_a[1], np_b[1]) and tuple(np_a[2:]) == tuple(np_b[2:])
    return a[0] == b[0] and same_np and torch.equal(a[2], b[2])


def test_replay_ignores_and_preserves_global_rng(photos, photo_shard):
    """Global random/numpy/torch seeds do not change a replay, and a replay does not move them."""
    recipe = make_recipe("deit", img_size=32)
    shard = ShardInfo(photo_shard, 31)
    results = []
    for global_seed in (0, 99):
        random.seed(global_seed)
        np.random.seed(global_seed)
        torch.manual_seed(global_seed)
        before = _rng_states()
        pixels = [augment_view(img, recipe, SEED, v, key) for key, img in photos.items() for v in range(3)]
        pixels += [v.pixels for w in replay_shard(iter_decoded(shard, 0, 10), [0, 1], recipe, SEED, "x") for v in w]
        assert _states_equal(before, _rng_states()), "view replay read or changed a global RNG"
        results.append(pixels)
    assert len(results[0]) == len(results[1]) == 6 * 3 + 31 * 2
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Mixup / CutMix pairing


def _unmixed(shard: ShardInfo, recipe: Recipe, views: list[int], on_error: str) -> dict[tuple[str, int], torch.Tensor]:
    samples = iter_decoded(shard, 0, 10, on_error)  # type: ignore[arg-type]
    return {
        (v.key, v.view): v.pixels for w in replay_shard(samples, views, no_mix(recipe), SEED, shard.name) for v in w
    }


def _mixup_error(mixed: torch.Tensor, lam: float, a: torch.Tensor, b: torch.Tensor) -> float:
    return float((mixed - (lam * a + (1 - lam) * b)).abs().max())


def _cutmix_match(mixed: torch.Tensor, lam: float, a: torch.Tensor, b: torch.Tensor) -> tuple[int, int] | None:
    """If ``mixed`` is ``a`` with one rectangle pasted from ``b``, return (box area, side**2) else None.

    The rectangle is the bounding box of the pixels that differ from ``a``; inside it every pixel
    must come from ``b``, outside it from ``a``. Where ``a`` and ``b`` agree the true box may be
    larger, so the area found is at most the area implied by ``lam``.
    """
    changed = (mixed != a).any(0)
    if not bool(changed.any()):
        return None
    ys, xs = torch.nonzero(changed, as_tuple=True)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    expected = a.clone()
    expected[:, y0:y1, x0:x1] = b[:, y0:y1, x0:x1]
    if not torch.equal(mixed, expected):
        return None
    return (y1 - y0) * (x1 - x0), a.shape[1] * a.shape[2]


def check_pairs(shard: ShardInfo, recipe: Recipe, views: list[int], on_error: str = "raise") -> dict:
    """Read the shard twice, check the pairing contract on every window; return counts by kind.

    ``kinds["skipped"]`` counts samples skipped per read (``on_error="skip"``).
    """
    reads, skipped = [], []
    for _ in range(2):
        stats = SkipStats()
        samples = iter_decoded(shard, 0, 10, on_error, stats)  # type: ignore[arg-type]
        reads.append([list(w) for w in replay_shard(samples, views, recipe, SEED, shard.name)])
        skipped.append(stats.total)
    first, second = reads
    assert skipped[0] == skipped[1]
    assert len(first) == len(second)
    for wa, wb in zip(first, second, strict=True):
        for a, b in zip(wa, wb, strict=True):
            assert (a.key, a.view, a.label, a.mix_label, a.lam) == (b.key, b.view, b.label, b.mix_label, b.lam)
            assert torch.equal(a.pixels, b.pixels), a.key

    unmixed = _unmixed(shard, recipe, views, on_error)
    by_view: dict[int, list[View]] = defaultdict(list)
    for w in first:
        by_view[w[0].view].extend(w)
    kinds: dict[str, int] = defaultdict(int, skipped=skipped[0])
    for view, members in by_view.items():
        partner: dict[str, str] = {}
        for a in members:
            ua = unmixed[a.key, view]
            if a.lam == 1.0:
                # Unmixed (odd leftover) or an empty cutmix box: the pixels are the sample's own view.
                assert torch.equal(a.pixels, ua), a.key
                continue
            assert 0.0 < a.lam < 1.0
            # Search the partner among all samples of the shard (not only the window), by pixels.
            found = []
            for b in members:
                if b.key == a.key:
                    continue
                ub = unmixed[b.key, view]
                if _mixup_error(a.pixels, a.lam, ua, ub) < 1e-5:
                    found.append((b, "mixup"))
                else:
                    box = _cutmix_match(a.pixels, a.lam, ua, ub)
                    if box is not None:
                        area, total = box
                        assert area <= round((1 - a.lam) * total), (a.key, area, a.lam)
                        found.append((b, "cutmix" if area == round((1 - a.lam) * total) else "cutmix-partial"))
            assert len(found) == 1, f"view {view} key {a.key}: {len(found)} candidate partners"
            b, kind = found[0]
            partner[a.key] = b.key
            kinds[kind] += 1
            assert b.position // recipe.mix_window == a.position // recipe.mix_window, "partner outside window"
            assert b.shard_index == a.shard_index
            assert a.mix_label == b.label and b.mix_label == a.label
            assert b.lam == a.lam, "members of a pair must share lambda"
            ub = unmixed[b.key, view]
            if kind == "mixup":
                assert _mixup_error(b.pixels, b.lam, ub, ua) < 1e-5
            else:
                assert _cutmix_match(b.pixels, b.lam, ub, ua) is not None
        for a_key, b_key in partner.items():
            assert partner.get(b_key) == a_key, "pairing must be symmetric"
        # Leftovers: with every pair mixed, a window of n present samples leaves n % 2 unmixed.
        windows: dict[int, list[View]] = defaultdict(list)
        for a in members:
            windows[a.position // recipe.mix_window].append(a)
        for idx, ws in windows.items():
            alone = [a for a in ws if a.key not in partner]
            if recipe.mixup > 0 and recipe.cutmix == 0 and recipe.mixup_prob == 1.0:
                assert len(alone) == len(ws) % 2, (view, idx, len(ws), len(alone))
            for a in alone:
                assert a.lam == 1.0
                if len(ws) % 2 and len(alone) == 1:
                    assert a.mix_label == a.label, "odd leftover must stay unmixed"
            kinds["alone"] += len(alone)
    return dict(kinds)


def test_mixup_pairs_within_shard_window(tmp_path):
    """Mixup only, windows of 8 over shards of 45 (last window odd): pairs, shared lambda, exact mix."""
    pattern = write_digits_shards(tmp_path, 90, 45, prefix="mix")
    recipe = dataclasses.replace(make_recipe("deit", img_size=32), cutmix=0.0, mix_window=8)
    for i, shard in enumerate(load_shard_list(pattern)):
        kinds = check_pairs(shard, recipe, [0, 1] if i == 0 else [2])
        windows_odd = 1  # positions 40..44
        n_views = 2 if i == 0 else 1
        assert kinds.get("alone", 0) == windows_odd * n_views
        assert kinds["mixup"] == (45 - 1) * n_views


def test_cutmix_pairs_paste_one_box(photo_shard):
    """CutMix only on textured photos: each member is its own view with one box from its partner."""
    recipe = dataclasses.replace(make_recipe("deit", img_size=32), mixup=0.0, mix_window=8)
    kinds = check_pairs(ShardInfo(photo_shard, 31), recipe, [0, 1])
    assert kinds.get("cutmix", 0) + kinds.get("cutmix-partial", 0) >= 40
    # On textured photos the changed pixels span the whole box, so its area matches lambda exactly.
    assert kinds.get("cutmix", 0) >= 0.9 * (kinds.get("cutmix", 0) + kinds.get("cutmix-partial", 0))
    assert "mixup" not in kinds


def test_deit_mixing_pairs(photo_shard):
    """The full DeiT recipe (mixup or cutmix per pair, window 64) keeps the pairing contract."""
    recipe = make_recipe("deit", img_size=32)
    kinds = check_pairs(ShardInfo(photo_shard, 31), recipe, [0, 1, 2])
    assert kinds.get("mixup", 0) > 0 and kinds.get("cutmix", 0) > 0
    assert kinds["alone"] >= 3  # 31 samples in one window: one leftover per view


def test_skipped_sample_leaves_a_gap_not_a_shift(tmp_path, photo_shard):
    """A bad sample skipped in one window does not change pairs or views in any other window."""
    recipe = dataclasses.replace(make_recipe("deit", img_size=32), cutmix=0.0, mix_window=8)
    good = ShardInfo(photo_shard, 31)
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    bad_url = str(bad_dir / Path(photo_shard).name)  # same shard name: same mixing seeds
    with wds.TarWriter(bad_url) as sink:
        for i, s in enumerate(wds.WebDataset(photo_shard, shardshuffle=False)):
            data = b"not a jpeg" if i == 3 else s["jpg"]
            sink.write({"__key__": s["__key__"], "jpg": data, "cls": s["cls"]})
    bad = ShardInfo(bad_url, 31)
    kinds = check_pairs(bad, recipe, [0], on_error="skip")
    assert kinds["skipped"] == 1
    assert kinds["alone"] == 1 + 1  # window 0 now has 7 samples, window 3 has 7
    clean = {v.key: v for w in replay_shard(iter_decoded(good, 0, 10), [0], recipe, SEED, good.name) for v in w}
    gapped = {v.key: v for w in replay_shard(iter_decoded(bad, 0, 10, "skip"), [0], recipe, SEED, bad.name) for v in w}
    assert len(gapped) == 30
    for key, v in gapped.items():
        assert v.position == clean[key].position
        if v.position >= recipe.mix_window:
            assert torch.equal(v.pixels, clean[key].pixels) and v.lam == clean[key].lam, key
