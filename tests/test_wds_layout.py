"""timm's webdataset layout (``timm/imagenet-1k-wds`` on the Hugging Face hub) read as it is.

The replica is made here at a tiny size, with that layout's names and members, as timm's converter
(``tfds_to_wds.py`` of rwightman/imagenet-12k) writes them: shards ``imagenet1k-train-{0000..}.tar`` and
``imagenet1k-validation-{00..}.tar``; per sample ``<key>.cls`` (the label as text), ``<key>.jpg`` and
``<key>.json`` (``label``, ``width``, ``height``, ``filename``), keys being the original file names
without extension (``n01440764_10026``, ``ILSVRC2012_val_00000001``); and the split info file
``_info.json``: ``{"name", "splits": {"train": {"name", "filenames", "shard_lengths", "num_samples"}, ...}}``,
which timm's ``ReaderWds`` reads (also as YAML). Images are the scikit-learn digits as JPEG.

Checked: ``DIR/_info.json#train`` gives the split's shards and counts without opening a tar (so does a
brace pattern of the shards, from the ``_info.json`` beside them); a missing or unknown split and an
inconsistent file are one error naming what to do; labels come from ``.cls`` (and equal ``--label-key
label``); cache-teacher and train-student run end to end on it.
"""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import cache_cli_args, student_config
from PIL import Image
from typer.testing import CliRunner

import pipeline.shards.lists
from cli.main import app
from pipeline.cache import open_cache
from pipeline.errors import DataError
from pipeline.phase2.train import train
from pipeline.shards.lists import class_names, load_shard_list
from pipeline.shards.pack import digits_items
from pipeline.shards.samples import iter_raw

pytestmark = pytest.mark.usefixtures("one_thread")

SPLITS = {"train": (3, 40, 0), "validation": (2, 30, 1000)}  # shards, samples per shard, first digit
DIGITS = {"train": 4, "validation": 2}  # the converter's %0Nd: ceil(log10(shards)) digits, here as in the hub's


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 1700000000, 0o644
    tar.addfile(info, io.BytesIO(data))


def _jpeg(png: bytes) -> tuple[bytes, int, int]:
    img = Image.open(io.BytesIO(png)).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue(), *img.size


def write_split(root: Path, split: str) -> dict:
    """One split's shards (members .cls, .jpg, .json per key, in that order) and its split info entry."""
    shards, per_shard, first = SPLITS[split]
    _, items = digits_items(32)
    chosen = list(itertools.islice(items, first, first + shards * per_shard))
    names = []
    for s in range(shards):
        name = f"imagenet1k-{split}-{s:0{DIGITS[split]}d}.tar"
        with tarfile.open(root / name, "w") as tar:
            for i, item in enumerate(chosen[s * per_shard : (s + 1) * per_shard]):
                n = s * per_shard + i
                key = f"n0{1440764 + item.label}_{n}" if split == "train" else f"ILSVRC2012_val_{n + 1:08d}"
                jpg, w, h = _jpeg(item.load())
                doc = {"label": item.label, "width": w, "height": h, "filename": f"{key}.JPEG"}
                _member(tar, f"{key}.cls", str(item.label).encode())
                _member(tar, f"{key}.jpg", jpg)
                _member(tar, f"{key}.json", json.dumps(doc).encode())
        names.append(name)
    lengths = [per_shard] * shards
    return {"name": split, "filenames": names, "shard_lengths": lengths, "num_samples": sum(lengths)}


@pytest.fixture(scope="module")
def wds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny timm/imagenet-1k-wds: 3 train shards of 40, 2 validation shards of 30, _info.json (+ .yaml)."""
    root = tmp_path_factory.mktemp("imagenet-1k-wds")
    info = {"name": "imagenet1k", "splits": {split: write_split(root, split) for split in SPLITS}}
    (root / "_info.json").write_text(json.dumps(info, indent=4))
    (root / "_info.yaml").write_text(yaml.safe_dump(info))
    return root


@pytest.fixture
def no_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(url: str) -> int:
        raise AssertionError(f"{url} was opened to count its samples")

    monkeypatch.setattr(pipeline.shards.lists, "count_samples", refuse)


def test_split_info_gives_each_splits_shards_and_counts(wds: Path, no_scan: None) -> None:
    for spec in (f"{wds}/_info.json#train", f"{wds}/_info.yaml#train", f"{wds}/imagenet1k-train-{{0000..0002}}.tar"):
        shards = load_shard_list(spec)
        assert [(s.name, s.count) for s in shards] == [(f"imagenet1k-train-{i:04d}.tar", 40) for i in range(3)], spec
        assert shards[0].url == str(wds / "imagenet1k-train-0000.tar")
    val = load_shard_list(f"{wds}/_info.json#validation")
    assert [(s.name, s.count) for s in val] == [
        ("imagenet1k-validation-00.tar", 30),
        ("imagenet1k-validation-01.tar", 30),
    ]
    assert class_names(f"{wds}/_info.json#train") is None, "the layout has no class names: labels are .cls ids"


def test_split_info_mistakes_are_one_error_naming_the_fix(wds: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"splits \['train', 'validation'\]: name one, e\.g\. .*_info\.json#train"):
        load_shard_list(f"{wds}/_info.json")
    with pytest.raises(DataError, match=r"no split 'val' \(its splits: \['train', 'validation'\]\)"):
        load_shard_list(f"{wds}/_info.json#val")
    info = json.loads((wds / "_info.json").read_text())
    info["splits"]["train"]["num_samples"] = 121
    (tmp_path / "_info.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match="num_samples 121 but its shard_lengths sum to 120"):
        load_shard_list(f"{tmp_path}/_info.json#train")
    (tmp_path / "train.json").write_text(json.dumps({"wids_version": 1, "shardlist": []}))
    with pytest.raises(DataError, match=r"'#train' names a split, but .* is not a split info file"):
        load_shard_list(f"{tmp_path}/train.json#train")


def test_labels_are_the_cls_members(wds: Path) -> None:
    (shard,) = load_shard_list(f"{wds}/imagenet1k-validation-00.tar")
    by_cls = [(r.key, r.label) for r in iter_raw(shard, 0, num_classes=10)]
    by_json = [(r.key, r.label) for r in iter_raw(load_shard_list(shard.url, label_key="label")[0], 0)]
    assert by_cls == by_json and by_cls[0][0] == "ILSVRC2012_val_00000001"
    assert len({label for _, label in by_cls}) == 10


def test_cache_teacher_and_train_student_on_the_layout(wds: Path, tiny_teacher: str, tmp_path: Path) -> None:
    """Both phases end to end from ``_info.json#train`` / ``#validation``; classes from the teacher's classifier."""
    out = tmp_path / "cache.zarr"
    args = cache_cli_args(f"{wds}/_info.json#train", tiny_teacher, out, views=2, view_block=1, batch_size=64)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    meta = open_cache(str(out)).meta
    assert meta.num_classes == 10 and [s.name for s in meta.shards] == [
        f"imagenet1k-train-{i:04d}.tar" for i in range(3)
    ]
    labels = np.asarray(open_cache(str(out)).read_view(0, 0).labels)
    (first,) = load_shard_list(f"{wds}/imagenet1k-train-0000.tar")
    assert labels.tolist() == [r.label for r in iter_raw(first, 0)]

    val = [f"{wds}/_info.json#validation"]
    final = train(student_config(f"{wds}/_info.json#train", str(out), tmp_path / "run", epochs=1, val_shards=val))
    assert final["samples"] == 60 and 0 <= final["top1_avg"] <= 100
