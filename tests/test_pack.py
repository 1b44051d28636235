"""Packing real image sets into shards and reading every sample back.

Sources: scikit-learn's digits (labels checked against ``load_digits().target`` by key index) and
a flat folder laid out like an ImageNet sample (``<synset>_<name>.JPEG`` files labelled by
``classes.tsv``, photo-like JPEGs made by ``tests/photos.py``, some grayscale). Packing is
deterministic (same bytes twice), the sidecar's counts are the shards' real counts, and every image
decodes to 3-channel RGB whatever its mode (grayscale, CMYK, palette, alpha).
"""

from __future__ import annotations

import io
import json
import os
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import write_digits_shards
from photos import write_synset_folder
from PIL import Image
from typer.testing import CliRunner

from pipeline.errors import ConfigError, DataError
from pipeline.shards.decode import iter_decoded
from pipeline.shards.lists import load_shard_list, num_classes_from_sidecar
from pipeline.shards.pack import pack
from pipeline.shards.samples import iter_raw
from pipeline.shards.tars import count_samples


@pytest.fixture(scope="module")
def digits_data():
    from sklearn.datasets import load_digits

    return load_digits()


@pytest.fixture(scope="module")
def synset_folder(tmp_path_factory) -> Path:
    """40 photo-like JPEGs of 12 classes in a flat folder with ``classes.tsv``; 5 are grayscale."""
    root = tmp_path_factory.mktemp("synsets")
    write_synset_folder(root, classes=12, images=40, gray_every=8)
    return root


@pytest.fixture(scope="module")
def imagenet_classes(synset_folder) -> list[str]:
    rows = [line.split("\t") for line in (synset_folder / "classes.tsv").read_text().splitlines() if line.strip()]
    assert [int(r[0]) for r in rows] == list(range(len(rows)))
    return [r[1] for r in rows]


@pytest.fixture(scope="module")
def packed_imagenet(tmp_path_factory, synset_folder) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("inet-pack")
    return out, pack(str(synset_folder), str(out), per_shard=16)


def read_split(out: Path, meta: dict) -> list:
    """Every decoded sample of one packed split, checking counts against the sidecar on the way."""
    shards = load_shard_list(str(out / meta["pattern"]))
    assert [s.name for s in shards] == [s["name"] for s in meta["shards"]]
    samples = []
    for i, (shard, side) in enumerate(zip(shards, meta["shards"], strict=True)):
        assert shard.count == side["count"] == count_samples(shard.url)  # the sidecar matches the tar itself
        got = list(iter_decoded(shard, i, num_classes=meta["num_classes"]))
        assert len(got) == side["count"]
        assert dict(Counter(s.label for s in got)) == {int(k): v for k, v in side["class_counts"].items()}
        samples += got
    assert len(samples) == meta["num_samples"] == sum(s["count"] for s in meta["shards"])
    return samples


def test_pack_digits_with_val_split(tmp_path, digits_data):
    """All 1797 digits land in exactly one split, with their own label and their own image."""
    meta = pack("digits", str(tmp_path), per_shard=500, val_fraction=0.2)
    assert set(meta) == {"train", "val"}
    train = read_split(tmp_path, meta["train"])
    val = read_split(tmp_path, meta["val"])
    assert meta["train"]["num_classes"] == 10 == num_classes_from_sidecar(str(tmp_path / "train-000000.tar"))
    assert 0.1 * 1797 < len(val) < 0.3 * 1797
    train_keys, val_keys = {s.key for s in train}, {s.key for s in val}
    assert not train_keys & val_keys
    assert train_keys | val_keys == {f"digits-{i:05d}" for i in range(1797)}
    for s in train + val:
        index = int(s.key.removeprefix("digits-"))
        assert s.label == digits_data.target[index], s.key
        assert s.image.mode == "RGB" and s.image.size == (32, 32)
    # The image is the digit of that index: shrunk back to 8x8, of all 1797 scans it matches its own best.
    scans = digits_data.images.reshape(len(digits_data.images), -1)
    scans = scans - scans.mean(1, keepdims=True)
    scans /= np.linalg.norm(scans, axis=1, keepdims=True) + 1e-9
    for s in (train + val)[::7]:
        small = np.asarray(s.image.convert("L").resize((8, 8), Image.BOX), dtype=np.float64).ravel()
        corr = scans @ ((small - small.mean()) / np.linalg.norm(small - small.mean()))
        assert f"digits-{int(np.argmax(corr)):05d}" == s.key and corr.max() > 0.95, s.key
    # Shards mix classes (mixup partners are drawn inside a shard), they are not sorted by label.
    for side in meta["train"]["shards"]:
        assert len(side["class_counts"]) == 10


def test_pack_synset_folder_labels_bytes_and_modes(packed_imagenet, imagenet_classes, synset_folder):
    """Every file is packed once, byte for byte, labelled by the classes.tsv index of its synset."""
    out, meta = packed_imagenet
    assert set(meta) == {"train"} and meta["train"]["classes"] == imagenet_classes
    assert [s["count"] for s in meta["train"]["shards"]] == [16, 16, 8]
    samples = read_split(out, meta["train"])
    files = {p.stem: p for p in synset_folder.glob("*.JPEG")}
    assert len(files) == 40 and {s.key for s in samples} == set(files)
    for s in samples:
        synset = s.key.split("_")[0]
        assert s.label == imagenet_classes.index(synset), s.key
        assert s.image.mode == "RGB"
        assert s.image.size == Image.open(files[s.key]).size
    gray = [s for s in samples if Image.open(files[s.key]).mode == "L"]
    assert len(gray) == 5  # the folder's grayscale JPEGs, now RGB with equal channels
    for s in gray:
        r, g, b = s.image.split()
        assert r.tobytes() == g.tobytes() == b.tobytes()
    for i, shard in enumerate(load_shard_list(str(out / meta["train"]["pattern"]))):
        for raw in iter_raw(shard, i):
            assert raw.image == files[raw.key].read_bytes()


def test_repacking_gives_identical_shards(tmp_path, packed_imagenet, synset_folder, monkeypatch):
    """Packing the same source again, at another time, writes the same bytes (same keys, same order)."""
    out, meta = packed_imagenet
    monkeypatch.setattr(time, "time", lambda: 2_000_000_000.0)  # tar headers must not record "now"
    again = pack(str(synset_folder), str(tmp_path), per_shard=16)
    assert again == meta
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in tmp_path.iterdir()) and len(names) == 4
    for name in names:
        assert (out / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_split_is_by_key_not_by_position(tmp_path):
    """Which split a sample lands in depends on its key only, not on shard size or the other samples."""
    a = pack("digits", str(tmp_path / "a"), per_shard=300, val_fraction=0.1)
    b = pack("digits", str(tmp_path / "b"), per_shard=1000, val_fraction=0.1)

    def keys(out: Path, meta: dict) -> set[str]:
        shards = load_shard_list(str(out / meta["pattern"]))
        return {r.key for i, s in enumerate(shards) for r in iter_raw(s, i)}

    assert keys(tmp_path / "a", a["val"]) == keys(tmp_path / "b", b["val"])
    assert len(a["train"]["shards"]) > len(b["train"]["shards"])


def test_repacking_into_the_same_folder_leaves_no_stale_shards(tmp_path):
    """A smaller repack into a used folder must not leave old shards for a glob to pick up (with --replace;
    without, it refuses: tests/test_pack_keeps_files.py)."""
    pack("digits", str(tmp_path), per_shard=300)  # 6 shards
    meta = pack("digits", str(tmp_path), per_shard=900, replace=True)  # 2 shards
    shards = load_shard_list(str(tmp_path / "train-*.tar"))
    assert [s.name for s in shards] == [s["name"] for s in meta["train"]["shards"]]
    assert sum(s.count for s in shards) == 1797


def _image_bytes(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_image_modes_become_rgb(tmp_path):
    """CMYK and grayscale JPEGs, palette and RGBA PNGs are all read back as 3-channel RGB."""
    root = tmp_path / "folder"
    red, blue = (230, 20, 20), (20, 20, 230)
    files = {
        "warm/cmyk.jpg": _image_bytes(Image.new("RGB", (40, 30), red).convert("CMYK"), "JPEG"),
        "warm/gray.jpeg": _image_bytes(Image.new("L", (30, 40), 200), "JPEG"),
        "cold/palette.png": _image_bytes(Image.new("RGB", (16, 16), blue).convert("P", palette=Image.ADAPTIVE), "PNG"),
        "cold/alpha.png": _image_bytes(Image.new("RGBA", (16, 16), (*blue, 128)), "PNG"),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    assert Image.open(root / "warm/cmyk.jpg").mode == "CMYK"
    meta = pack(str(root), str(tmp_path / "out"), per_shard=3)
    assert meta["train"]["classes"] == ["cold", "warm"]
    samples = {s.key: s for s in read_split(tmp_path / "out", meta["train"])}
    assert set(samples) == {"warm--cmyk", "warm--gray", "cold--palette", "cold--alpha"}
    expected = {
        "warm--cmyk": (1, red),
        "warm--gray": (1, (200, 200, 200)),
        "cold--palette": (0, blue),
        "cold--alpha": (0, blue),
    }
    for key, (label, colour) in expected.items():
        s = samples[key]
        assert s.label == label and s.image.mode == "RGB"
        pixel = np.asarray(s.image)[s.image.height // 2, s.image.width // 2]
        assert np.abs(pixel.astype(int) - np.array(colour)).max() <= 8, (key, pixel)


def test_pack_refuses_ambiguous_inputs(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    (root / "classes.tsv").write_text("0\tn0001\tcat\n1\tn0002\tdog\n")
    (root / "n0001_a.png").write_bytes(_image_bytes(Image.new("RGB", (8, 8)), "PNG"))
    (root / "n0009_b.png").write_bytes(_image_bytes(Image.new("RGB", (8, 8)), "PNG"))
    with pytest.raises(DataError, match=re.escape("n0009_b.png")):
        pack(str(root), str(tmp_path / "o1"))
    (root / "n0009_b.png").unlink()
    (root / "n0001_a.jpg").write_bytes(_image_bytes(Image.new("RGB", (8, 8)), "JPEG"))  # same key as the png
    with pytest.raises(DataError, match="n0001_a"):
        pack(str(root), str(tmp_path / "o2"))
    for bad in (
        {"per_shard": 0},
        {"val_fraction": 1.0},
        {"val_fraction": -0.1},
        {"val_fraction": 0.2, "prefix": "val"},
    ):
        with pytest.raises(ConfigError):
            pack("digits", str(tmp_path / "o3"), **bad)
    with pytest.raises(DataError, match="no-such-folder"):
        pack(str(tmp_path / "no-such-folder"), str(tmp_path / "o4"))


def test_cli_pack(tmp_path, digits_data):
    from cli.main import app

    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(app, ["pack", "digits", str(out), "--per-shard", "700", "--val-fraction", "0.25"])
    assert result.exit_code == 0, result.output
    side = json.loads((out / "train.json").read_text())
    val_side = json.loads((out / "val.json").read_text())
    assert f"train: {side['num_samples']} samples in {len(side['shards'])} shards" in result.output
    assert side["num_samples"] + val_side["num_samples"] == 1797
    samples = read_split(out, side)
    assert all(s.label == digits_data.target[int(s.key[7:])] for s in samples)
    assert sorted(os.listdir(out)) == sorted(
        ["train.json", "val.json"] + [s["name"] for s in side["shards"]] + [s["name"] for s in val_side["shards"]]
    )
    # Bad arguments fail with a message and a non-zero status, not a traceback.
    for args in (
        ["pack", str(tmp_path / "missing"), str(tmp_path / "o")],
        ["pack", "digits", str(out), "--val-fraction", "1.5"],
    ):
        bad = runner.invoke(app, args)
        assert bad.exit_code != 0
        assert "error" in bad.output.lower() and not isinstance(bad.exception, (KeyError, TypeError, AttributeError))


# ---------------------------------------------------------------------------------------------
# Nothing lost or mislabelled without a word


def _photo_folder(root: Path) -> dict[str, bytes]:
    """Two classes of photo-like images in every format a folder may hold, plus files that are not images."""
    from photos import encode, photo, to_mode

    files: dict[str, bytes] = {}
    for i in range(6):
        files[f"cat/c{i}.jpg"] = encode(photo(i, (48, 36)), "JPEG")
        files[f"dog/d{i}.png"] = encode(photo(10 + i, (40, 40)), "PNG")
    anim = [photo(20 + k, (32, 24)).convert("P", palette=Image.ADAPTIVE) for k in range(2)]
    buf = io.BytesIO()
    anim[0].save(buf, format="GIF", save_all=True, append_images=anim[1:])
    files.update(
        {
            "cat/scan.bmp": encode(photo(30, (30, 20)), "BMP"),
            "cat/print.tif": encode(to_mode(photo(31, (30, 20)), "CMYK"), "TIFF"),
            "dog/deep.tiff": encode(to_mode(photo(32, (30, 20)), "I;16"), "TIFF"),
            "dog/anim.gif": buf.getvalue(),
            "dog/notes.txt": b"not an image",
            "cat/README": b"no extension",
            "cat/.DS_Store": b"\0\0",
            ".ipynb_checkpoints/c0-checkpoint.jpg": files["cat/c0.jpg"],
        }
    )
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def test_pack_reencodes_other_formats_and_reports_what_it_skips(tmp_path):
    """BMP/TIFF/GIF are packed as lossless PNG (reading gives the same RGB); other files are reported."""
    from pipeline.shards.decode import decode_image

    root = tmp_path / "src"
    files = _photo_folder(root)
    meta = pack(str(root), str(tmp_path / "out"), per_shard=5)["train"]
    assert meta["classes"] == ["cat", "dog"]  # the hidden .ipynb_checkpoints folder is not class 0
    samples = {s.key: s for s in read_split(tmp_path / "out", meta)}
    images = [
        r
        for r in files
        if not r.startswith(".") and r.rsplit(".", 1)[-1] in ("jpg", "png", "bmp", "tif", "tiff", "gif")
    ]
    assert len(samples) == meta["num_samples"] == len(images) == 16
    for rel in images:
        key = rel.rsplit(".", 1)[0].replace("/", "--")
        assert samples[key].label == (0 if rel.startswith("cat") else 1), rel
        want = np.asarray(decode_image(files[rel]))
        assert np.array_equal(np.asarray(samples[key].image), want), rel  # lossless: the same pixels
    skipped = {s["reason"]: s for s in meta["skipped"]}
    assert skipped["not an image (.txt)"]["examples"] == [os.path.join("dog", "notes.txt")]
    assert skipped["not an image (no extension)"]["count"] == 1
    assert skipped["hidden folder (ignored)"]["count"] == 1 and skipped["hidden file (ignored)"]["count"] == 1
    assert json.loads((tmp_path / "out" / "train.json").read_text())["skipped"] == meta["skipped"]


def test_cli_pack_prints_what_it_skips(tmp_path):
    from cli.main import app

    _photo_folder(tmp_path / "src")
    result = CliRunner().invoke(app, ["pack", str(tmp_path / "src"), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "train: 16 samples" in result.output
    assert "not packed: 1 file(s), not an image (.txt)" in result.output
    assert "hidden folder" in result.output


def test_hidden_folder_does_not_shift_labels(tmp_path):
    """A notebook's ``.ipynb_checkpoints`` next to the class folders used to become class 0."""
    root = tmp_path / "src"
    for cls in ("ant", "bee"):
        (root / cls).mkdir(parents=True)
        (root / cls / "x.png").write_bytes(_image_bytes(Image.new("RGB", (8, 8)), "PNG"))
    (root / ".ipynb_checkpoints").mkdir()
    meta = pack(str(root), str(tmp_path / "out"))["train"]
    assert meta["classes"] == ["ant", "bee"] and meta["num_classes"] == 2
    labels = {s.key: s.label for s in read_split(tmp_path / "out", meta)}
    assert labels == {"ant--x": 0, "bee--x": 1}


def test_repacking_without_val_removes_the_stale_val_split(tmp_path):
    """val-*.tar of an earlier pack hold keys that are now in train: a glob would mix them in twice (removed
    with --replace; without, the pack refuses: tests/test_pack_keeps_files.py)."""
    pack("digits", str(tmp_path), per_shard=500, val_fraction=0.2)
    assert list(tmp_path.glob("val-*.tar"))
    meta = pack("digits", str(tmp_path), per_shard=500, replace=True)
    assert set(meta) == {"train"}
    assert not list(tmp_path.glob("val-*")) and not (tmp_path / "val.json").exists()
    shards = load_shard_list(str(tmp_path / "*.tar"))
    keys = [r.key for i, s in enumerate(shards) for r in iter_raw(s, i)]
    assert len(keys) == len(set(keys)) == 1797


# ---------------------------------------------------------------------------------------------
# The sidecar is also a wids shard index


def test_pack_sidecar_is_a_wids_index(tmp_path, monkeypatch):
    """webdataset's wids reads pack's sidecar as a data set; stillroom starts from it without opening a tar."""
    wids = pytest.importorskip("wids")  # the dev extra installs it
    from pipeline.shards import lists as shards_mod

    write_digits_shards(tmp_path / "out", 100, 40)  # pack's own writer, on fewer digits
    index = tmp_path / "out" / "train.json"
    meta = json.loads(index.read_text())
    ds = wids.ShardListDataset(str(index), cache_dir=str(tmp_path / "wids-cache"), transformations=[])
    assert len(ds) == meta["num_samples"] == 100
    sample = ds[3]
    assert {".png", ".cls"} <= set(sample) and sample["__key__"].startswith("digits-")
    assert int(sample[".cls"].read()) == next(
        r.label for i, s in enumerate(load_shard_list(str(index))) for r in iter_raw(s, i) if r.key == sample["__key__"]
    )

    def no_tar(url):
        raise AssertionError(f"opened {url} to count it")

    monkeypatch.setattr(shards_mod, "count_samples", no_tar)
    monkeypatch.chdir(tmp_path)
    shards = load_shard_list("out/train.json")  # relative urls resolve against the index's folder
    assert [(s.url, s.count) for s in shards] == [(f"out/{s['name']}", s["count"]) for s in meta["shards"]]


def test_old_sidecar_without_wids_fields_is_still_read(tmp_path, monkeypatch):
    from pipeline.shards import lists as shards_mod

    write_digits_shards(tmp_path, 100, 40)
    side = json.loads((tmp_path / "train.json").read_text())
    old = {k: v for k, v in side.items() if k not in ("wids_version", "shardlist", "__kind__", "name", "skipped")}
    (tmp_path / "train.json").write_text(json.dumps(old))
    monkeypatch.setattr(shards_mod, "count_samples", lambda url: pytest.fail(f"opened {url} to count it"))
    by_pattern = load_shard_list(str(tmp_path / "train-*.tar"))
    by_index = load_shard_list(str(tmp_path / "train.json"))
    assert [(s.url, s.count) for s in by_pattern] == [(s.url, s.count) for s in by_index]
    assert [s.count for s in by_index] == [40, 40, 20]
    assert num_classes_from_sidecar(by_index[0].url) == 10
