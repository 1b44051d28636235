"""Exact view replay: a view is a pure function of (image bytes, recipe, seed, view, key).

These tests protect the central invariant of the design: the pixels the student trains on are
the pixels the teacher saw. They compare replays across fresh processes, DataLoader worker counts,
re-sharded copies of the data, moved shards and polluted global RNG state, on the scikit-learn
digits (real scans) and on photo-like JPEGs made by ``tests/photos.py`` (some grayscale), and check the
mixup/cutmix pairing contract: partners in the same shard (and repeated-augmentation group), new for
every view, one shared lambda, crossed labels, an odd leftover unmixed, and mixed pixels that really
are the mix of the two unmixed views.
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

from pipeline.phase2.lanes import StreamSpec, epoch_batches
from pipeline.shards.decode import decode_image, iter_decoded
from pipeline.shards.lists import ShardInfo, load_shard_list
from pipeline.shards.samples import SkipStats
from pipeline.views import deal as dl
from pipeline.views.augment import augment_view
from pipeline.views.mixing import partners
from pipeline.views.pixels import model_input
from pipeline.views.plans import epoch_plan, groups
from pipeline.views.recipe import Recipe, make_recipe
from pipeline.views.replay import View, replay_shard

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
        for v in replay_shard(iter_decoded(shard, i, 10), views, recipe, seed, shard.name, shard.count):
            assert (v.key, v.view_id) not in out
            out[v.key, v.view_id] = v
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


def _spec(pattern: str, recipe: Recipe, view: int, workers: int) -> StreamSpec:
    """Every shard of ``pattern`` at one view on one rank, with no cache (the trainer's data path alone)."""
    shards = load_shard_list(pattern)
    plan = epoch_plan(view, 1, 1 << 30)
    return StreamSpec(
        shards=shards,
        lanes=dl.split_lanes(dl.deal(shards, plan, SEED, 1).segments(0), max(workers, 1)),
        starts=[],
        plan=plan,
        recipe=recipe,
        seed=SEED,
        num_classes=10,
        pairing=recipe.repeats,
    )


def _stream_views(pattern: str, recipe: Recipe, view: int, workers: int) -> dict[str, tuple]:
    out = {}
    for batch in epoch_batches(_spec(pattern, recipe, view, workers), 8, 24, seed=workers):
        assert batch["pixels"].shape == (8, 3, 32, 32)
        pixels = model_input(batch["pixels"])
        for i, key in enumerate(batch["keys"]):
            assert key not in out
            out[key] = (pixels[i], int(batch["label"][i]), int(batch["mix_label"][i]), float(batch["lam"][i]))
    return out


@pytest.mark.parametrize("view", [0, 3])
def test_dataloader_workers_do_not_change_views(digits_shards, view):
    """0 or 2 loader workers (lanes), shuffled into exact-size batches, give the views phase 1 replays."""
    recipe = make_recipe("deit", img_size=32)
    serial = _stream_views(digits_shards, recipe, view, workers=0)
    parallel = _stream_views(digits_shards, recipe, view, workers=2)
    assert len(serial) == 120 and serial.keys() == parallel.keys()
    for key, (px, label, mix_label, lam) in serial.items():
        px2, label2, mix_label2, lam2 = parallel[key]
        assert torch.equal(px, px2) and (label, mix_label, lam) == (label2, mix_label2, lam2), key
    replayed = shard_views(digits_shards, recipe, [view])
    for (key, _), v in replayed.items():
        lam32 = float(torch.tensor(v.lam, dtype=torch.float32))  # batches carry lambda as float32
        assert torch.equal(model_input(v.pixels), serial[key][0]) and lam32 == serial[key][3], key


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

    Mixing partners depend on the shard's name (and count) only; its place in the list and its
    directory are not part of a view's identity.
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
        for v in replay_shard(iter_decoded(shard, i, 10), [1], recipe, SEED, shard.name, shard.count):
            again[v.key, v.view_id] = v
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
        pixels += [v.pixels for v in replay_shard(iter_decoded(shard, 0, 10), [0, 1], recipe, SEED, "x", 31)]
        assert _states_equal(before, _rng_states()), "view replay read or changed a global RNG"
        results.append(pixels)
    assert len(results[0]) == len(results[1]) == 6 * 3 + 31 * 2
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Mixup / CutMix pairing


def _unmixed(shard: ShardInfo, recipe: Recipe, views: list[int], on_error: str) -> dict[tuple[str, int], torch.Tensor]:
    """Each sample's own view, finished but not mixed, as the model sees it."""
    samples = iter_decoded(shard, 0, 10, on_error)  # type: ignore[arg-type]
    return {
        (v.key, v.view_id): model_input(v.pixels)
        for v in replay_shard(samples, views, no_mix(recipe), SEED, shard.name, shard.count)
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


def _replay_twice(shard: ShardInfo, recipe: Recipe, views: list[int], on_error: str) -> tuple[list[View], int]:
    """All finished views of ``shard``, read and replayed twice (must agree), and the samples skipped."""
    reads, skipped = [], []
    for _ in range(2):
        stats = SkipStats()
        samples = iter_decoded(shard, 0, 10, on_error, stats)  # type: ignore[arg-type]
        reads.append(sorted(replay_shard(samples, views, recipe, SEED, shard.name, shard.count), key=_order))
        skipped.append(stats.total)
    first, second = reads
    assert skipped[0] == skipped[1] and len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert (a.key, a.view_id, a.label, a.mix_label, a.lam) == (b.key, b.view_id, b.label, b.mix_label, b.lam)
        assert torch.equal(a.pixels, b.pixels), a.key
    return first, skipped[0]


def _order(v: View) -> tuple[int, int]:
    return v.view_id, v.position


def _mix_kind(a: View, b: View, unmixed: dict, view: int) -> str:
    """How ``a``'s pixels were made from its own and ``b``'s unmixed views: exactly a mixup or a cutmix."""
    ua, ub, mixed = unmixed[a.key, view], unmixed[b.key, view], model_input(a.pixels)
    if _mixup_error(mixed, a.lam, ua, ub) < 2e-3:  # mixed in float32, then rounded to float16
        return "mixup"
    box = _cutmix_match(mixed, a.lam, ua, ub)
    assert box is not None, f"view {view}: {a.key} is neither a mixup nor a cutmix with {b.key}"
    area, total = box
    assert area <= round((1 - a.lam) * total), (a.key, area, a.lam)
    return "cutmix" if area == round((1 - a.lam) * total) else "cutmix-partial"


def check_pairs(shard: ShardInfo, recipe: Recipe, views: list[int], on_error: str = "raise") -> dict:
    """Read the shard twice, check the pairing contract on every view; return counts by kind.

    Who is whose partner comes from :func:`pipeline.views.mixing.partners`; that each mixed view really is
    its own view mixed with that partner's (and nothing else) is checked on the pixels.
    ``kinds["skipped"]`` counts samples skipped per read (``on_error="skip"``); ``kinds["partners"]``
    maps each key to the set of partner keys it met over ``views``.
    """
    first, skipped = _replay_twice(shard, recipe, views, on_error)
    unmixed = _unmixed(shard, recipe, views, on_error)
    kinds: dict = defaultdict(int, skipped=skipped)
    met: dict[str, set[str]] = defaultdict(set)
    for view in views:
        members = {v.position: v for v in first if v.view_id == view}
        group = groups(SEED, view // recipe.repeats, shard.name, shard.count, recipe.repeats)
        pairs = partners(SEED, view // recipe.repeats, shard.name, shard.count, recipe.repeats, members)
        assert sorted(p for pair in pairs for p in pair if p is not None) == sorted(members), "each sample once"
        for a_pos, b_pos in pairs:
            a = members[a_pos]
            if b_pos is None or a.lam == 1.0:  # alone, or a pair left unmixed (mixup_prob, empty box)
                b = members.get(b_pos) if b_pos is not None else None
                for v in (a, b) if b is not None else (a,):
                    assert v.lam == 1.0 and v.mix_label == v.label, v.key
                    assert torch.equal(model_input(v.pixels), unmixed[v.key, view]), v.key
                kinds["alone"] += 1 if b is None else 2
                continue
            b = members[b_pos]
            assert group[a_pos] == group[b_pos], "partner outside the repeated-augmentation group"
            assert 0.0 < a.lam < 1.0 and b.lam == a.lam, "members of a pair share lambda"
            assert a.mix_label == b.label and b.mix_label == a.label
            for x, y in ((a, b), (b, a)):
                kinds[_mix_kind(x, y, unmixed, view)] += 1
                met[x.key].add(y.key)
    kinds["partners"] = dict(met)
    return dict(kinds)


def test_mixup_partners_come_from_the_whole_shard(tmp_path):
    """Mixup only, shards of 45: every view pairs 44 samples (one left alone), partners anywhere in the
    shard and new for each view; over 8 views each sample meets several partners from far positions."""
    pattern = write_digits_shards(tmp_path, 90, 45, prefix="mix")
    recipe = dataclasses.replace(make_recipe("deit", img_size=32), cutmix=0.0)
    for shard in load_shard_list(pattern)[:1]:
        kinds = check_pairs(shard, recipe, list(range(8)))
        assert kinds["alone"] == 8 and kinds["mixup"] == 44 * 8
        met = kinds["partners"]
        assert sum(len(p) for p in met.values()) / len(met) > 6, "partners should change from view to view"
        positions = {k: int(k.removeprefix("digits-")) for k in met}
        far = [abs(positions[a] - positions[b]) for a, ps in met.items() for b in ps]
        assert max(far) > 40, "partners are drawn from the whole shard, not a window"


def test_partners_stay_within_repeated_augmentation_groups(tmp_path):
    """With R = 3 repeats, view v pairs samples of the same group of block v // 3 only, and the groups
    of different blocks differ (a sample meets the whole shard over the views)."""
    pattern = write_digits_shards(tmp_path, 45, 45, prefix="ra")
    recipe = dataclasses.replace(make_recipe("deit", img_size=32), cutmix=0.0, repeats=3)
    [shard] = load_shard_list(pattern)
    kinds = check_pairs(shard, recipe, [0, 1, 2, 3])
    assert kinds["mixup"] + kinds["alone"] == 45 * 4 and kinds["alone"] <= 3 * 4
    g0, g1 = (groups(SEED, b, shard.name, 45, 3) for b in (0, 1))
    assert sorted(g0.count(g) for g in range(3)) == [15, 15, 15] and g0 != g1


def test_cutmix_pairs_paste_one_box(photo_shard):
    """CutMix only on textured photos: each member is its own view with one box from its partner."""
    recipe = dataclasses.replace(make_recipe("deit", img_size=32), mixup=0.0)
    kinds = check_pairs(ShardInfo(photo_shard, 31), recipe, [0, 1])
    assert kinds.get("cutmix", 0) + kinds.get("cutmix-partial", 0) >= 40
    # On textured photos the changed pixels span the whole box, so its area matches lambda exactly.
    assert kinds.get("cutmix", 0) >= 0.9 * (kinds.get("cutmix", 0) + kinds.get("cutmix-partial", 0))
    assert "mixup" not in kinds


def test_deit_mixing_pairs(photo_shard):
    """The full DeiT recipe (mixup or cutmix per pair) keeps the pairing contract."""
    recipe = make_recipe("deit", img_size=32)
    kinds = check_pairs(ShardInfo(photo_shard, 31), recipe, [0, 1, 2])
    assert kinds.get("mixup", 0) > 0 and kinds.get("cutmix", 0) > 0
    assert kinds["alone"] >= 3  # 31 samples: one leftover per view


def test_skipped_sample_leaves_its_partner_alone_and_nothing_else_changes(tmp_path, photo_shard):
    """A bad sample skipped: its partner is left unmixed, every other view is unchanged, rows stay put."""
    recipe = dataclasses.replace(make_recipe("deit", img_size=32), cutmix=0.0)
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
    clean = {v.key: v for v in replay_shard(iter_decoded(good, 0, 10), [0], recipe, SEED, good.name, 31)}
    gapped = {v.key: v for v in replay_shard(iter_decoded(bad, 0, 10, "skip"), [0], recipe, SEED, bad.name, 31)}
    assert len(gapped) == 30 and "photo003" not in gapped
    [(a, b)] = [pair for pair in partners(SEED, 0, good.name, 31, 1, range(31)) if 3 in pair]
    orphan = f"photo{b if a == 3 else a:03d}"
    changed = [k for k, v in gapped.items() if not torch.equal(v.pixels, clean[k].pixels) or v.lam != clean[k].lam]
    assert changed == [orphan], f"only the skipped sample's partner may change, not {changed}"
    assert gapped[orphan].lam == 1.0 and clean[orphan].lam < 1.0
    assert all(v.position == clean[k].position for k, v in gapped.items())


@pytest.mark.parametrize("spec", ["rand-m9-n2", "rand-m9-mstd0.5-inc1", "rand-mstd101", "rand-m7-n3-p0.3-mmax9"])
def test_rand_augment_strings_mean_what_they_mean_in_timm(spec: str) -> None:
    """An omitted section takes timm's default (magnitude 10, no noise, the non-increasing ops), not DeiT's."""
    from timm.data.auto_augment import rand_augment_choices, rand_augment_transform

    from pipeline.views.recipe import RandAugmentSpec

    ours, theirs = RandAugmentSpec.parse(spec), rand_augment_transform(spec, {})
    op = theirs.ops[0]
    assert ours.num_layers == theirs.num_layers and ours.magnitude == op.magnitude
    assert ours.magnitude_std == op.magnitude_std and ours.prob == op.prob
    assert ours.magnitude_max == (op.magnitude_max if op.magnitude_max is not None else 10.0)
    assert [o.name for o in theirs.ops] == list(rand_augment_choices("", increasing=ours.increasing))
