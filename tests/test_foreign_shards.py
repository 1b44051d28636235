"""Shards stillroom did not write: plain tars of files, webdataset's writers, wids indexes, labels in
.json, ``pipe:`` commands, and a class count from the teacher checkpoint when there is no sidecar.

Each is read without repacking, with the same keys, labels and pixels as the files it was made
from, and a cache built from it equals the cache built from the same data in stillroom's own form.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
import yaml
import zarr
from conftest import TINY_STUDENT, cache_cli_args, write_digits_shards
from photos import encode, photo
from typer.testing import CliRunner

from cli.main import app
from pipeline.cache import ARRAYS
from pipeline.errors import DataError
from pipeline.shards.decode import decode_image, iter_decoded
from pipeline.shards.lists import expand_urls, load_shard_list, shard_name
from pipeline.shards.samples import iter_raw
from pipeline.shards.tars import count_samples

pytestmark = pytest.mark.usefixtures("one_thread")

FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


def _files(root: Path) -> dict[str, tuple[bytes, int]]:
    """Images in dotted folders, in every accepted format, each with a .cls; plus macOS ``._`` debris."""
    made: dict[str, tuple[bytes, int]] = {}
    for i, ext in enumerate(["jpg", "jpeg", "png", "webp", "jpg", "png"]):
        folder = "v1.0/a.b" if i % 2 else "v1.0/x.y.z"
        key = f"data/{folder}/img{i:03d}"
        made[key] = (encode(photo(100 + i, (40 + i, 30)), FORMATS[ext]), i % 3)
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / f"{key}.{ext}").write_bytes(made[key][0])
        (root / f"{key}.cls").write_text(str(i % 3))
    (root / "data/v1.0/a.b/._img001.jpeg").write_bytes(b"\0\5\26\7 AppleDouble")
    return made


def _check(shard_url: str, made: dict[str, tuple[bytes, int]], **kw) -> None:
    [shard] = load_shard_list(shard_url, **kw)
    assert shard.count == len(made)
    got = list(iter_decoded(shard, 0, num_classes=3))
    assert sorted(s.key.removeprefix("./") for s in got) == sorted(made)
    for s in got:
        data, label = made[s.key.removeprefix("./")]
        assert s.label == label
        assert np.array_equal(np.asarray(s.image), np.asarray(decode_image(data)))


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs the tar command")
def test_plain_tar_of_files_with_dotted_folders(tmp_path):
    """``tar --sort=name -cf`` of a folder: directory members, ``./`` prefixes, dots in folder names."""
    made = _files(tmp_path / "src")
    url = str(tmp_path / "plain-000000.tar")
    subprocess.run(["tar", "--sort=name", "-cf", url, "-C", str(tmp_path / "src"), "."], check=True)
    with tarfile.open(url) as tar:
        assert any(m.isdir() for m in tar.getmembers())  # folders are members too: not samples
    _check(url, made)


def test_webdataset_shardwriter_with_json_labels(tmp_path):
    """webdataset's ShardWriter, keys with dotted folders, labels in .json under a key the user names."""
    made = _files(tmp_path / "src")
    pattern = str(tmp_path / "sw-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=4, verbose=0) as sink:
        for key, (data, label) in sorted(made.items()):
            ext = next(p.suffix[1:] for p in (tmp_path / "src").glob(key + ".*") if p.suffix != ".cls")
            sink.write({"__key__": key, ext: data, "json": json.dumps({"label": label, "w": 1}).encode()})
    urls = expand_urls(str(tmp_path / "sw-*.tar"))
    assert len(urls) == 2
    shards = load_shard_list(urls, label_key="label")
    assert [s.count for s in shards] == [4, 2] and all(s.label_key == "label" for s in shards)
    got = {r.key: r.label for i, s in enumerate(shards) for r in iter_raw(s, i, num_classes=3)}
    assert got == {k: label for k, (_, label) in made.items()}
    with pytest.raises(DataError, match="--label-key"):  # .cls missing: the error says where labels may be
        list(iter_raw(load_shard_list(urls[0])[0], 0))


@pytest.mark.parametrize(
    ("doc", "word"),
    [
        ({"label": "seven"}, "non-integer"),
        ({"label": 1.5}, "non-integer"),
        ({"label": True}, "non-integer"),
        ({"other": 1}, "no 'label' field"),
        (None, "missing .json"),
        ("{not json", "invalid .json"),
        ({"label": 3}, "out of range"),
    ],
)
def test_bad_json_labels_name_shard_and_key(tmp_path, doc, word):
    url = str(tmp_path / "j-000000.tar")
    with wds.TarWriter(url) as sink:
        sink.write({"__key__": "good", "png": encode(photo(1, (8, 8)), "PNG"), "json": b'{"label": 2}'})
        bad = {"__key__": "bad", "png": encode(photo(2, (8, 8)), "PNG")}
        if doc is not None:
            bad["json"] = doc.encode() if isinstance(doc, str) else json.dumps(doc).encode()
        sink.write(bad)
    [shard] = load_shard_list(url, label_key="label")
    with pytest.raises(DataError) as info:
        list(iter_raw(shard, 0, num_classes=3))
    assert url in str(info.value) and "'bad'" in str(info.value) and word in str(info.value), str(info.value)


def test_wids_index_gives_urls_and_counts_without_opening_a_tar(tmp_path, monkeypatch):
    """An index written by webdataset's own ``widsindex create``: counts come from it, urls relative to it."""
    wids_index = pytest.importorskip("wids.wids_index")
    from pipeline.shards import lists as shards_mod

    data = tmp_path / "data"
    write_digits_shards(data / "part", 50, 20, prefix="d")
    (data / "part" / "d.json").unlink()  # no sidecar: only the index knows the counts
    monkeypatch.chdir(data)
    args = type("Args", (), {"files": ["part/d-{000000..000002}.tar"], "output": "idx.json", "name": "", "base": None})
    args.info = None
    wids_index.main_create(args)
    index = json.loads((data / "idx.json").read_text())
    assert index["wids_version"] == 1 and [s["nsamples"] for s in index["shardlist"]] == [20, 20, 10]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(shards_mod, "count_samples", lambda url: pytest.fail(f"opened {url} to count it"))
    shards = load_shard_list("data/idx.json")
    assert [(s.url, s.count) for s in shards] == [(f"data/part/d-{i:06d}.tar", n) for i, n in enumerate([20, 20, 10])]
    # Brace patterns and lists mix indexes and shards; a bad index is named.
    (tmp_path / "bad.json").write_text('{"shardlist": []}')
    with pytest.raises(DataError, match=re.escape("bad.json")):
        load_shard_list(str(tmp_path / "bad.json"))


# ---------------------------------------------------------------------------------------------
# pipe: shards


def test_pipe_shard_identity_is_the_file_it_reads(tmp_path, digits_shards):
    first = digits_shards.replace("{000000..000002}", "000000")
    spellings = [
        first,
        f"pipe:cat {first}",
        f"pipe:cat '{first}' | cat",
        f"pipe:curl -s -L https://host/d/{Path(first).name}?x=1",
    ]
    assert {shard_name(u) for u in spellings} == {"train-000000.tar"}
    [local] = load_shard_list(first)
    [piped] = load_shard_list(f"pipe:cat {first}")
    assert (piped.name, piped.count) == (local.name, local.count)
    assert [r.key for r in iter_raw(piped, 0)] == [r.key for r in iter_raw(local, 0)]
    with pytest.raises(DataError, match="wids index"):
        load_shard_list(f"pipe:cat {Path(first).parent}/*")


def _arrays(path: Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(g[name][...]) for name in ARRAYS}


def _invoke(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def test_pipe_shards_from_the_cli_give_the_cache_of_the_local_paths(tmp_path, digits_shards, tiny_teacher):
    """A YAML list of ``pipe:`` shards (and repeated --shards flags) stays a list of whole commands; the cache
    equals the one built from the plain paths (same fingerprint, same arrays), and training reads it."""
    urls = expand_urls(digits_shards)
    _invoke(cache_cli_args(digits_shards, tiny_teacher, tmp_path / "local", views=2, view_block=1))
    config = tmp_path / "pipes.yaml"
    config.write_text(yaml.safe_dump({"shards": [f"pipe:cat {u}" for u in urls]}))
    args = cache_cli_args(digits_shards, tiny_teacher, tmp_path / "piped", views=2, view_block=1)
    at = args.index("--shards")
    del args[at : at + 2]
    _invoke([*args, "--config", str(config)])
    local, piped = zarr.open_group(str(tmp_path / "local")), zarr.open_group(str(tmp_path / "piped"))
    assert local.attrs["stillroom"]["fingerprint"] == piped.attrs["stillroom"]["fingerprint"]
    assert [s["name"] for s in piped.attrs["stillroom"]["shards"]] == [Path(u).name for u in urls]
    a, b = _arrays(tmp_path / "local"), _arrays(tmp_path / "piped")
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    # Training from the piped cache, with the shards as plain paths and as pipe: flags.
    student = ["--model", "deit_tiny_distilled_patch16_224", "--model-kwargs", json.dumps(TINY_STUDENT)]
    common = [*student, "--epochs", "1", "--batch-size", "16", "--workers", "0", "--max-steps-per-epoch", "2"]
    common += ["--eval-every", "0", "--progress", "off", "--cache", str(tmp_path / "piped")]
    _invoke(["train-student", "--shards", digits_shards, "--out", str(tmp_path / "run-a"), *common])
    pipe_flags = [x for u in urls for x in ("--shards", f"pipe:cat {u}")]
    _invoke(["train-student", *pipe_flags, "--out", str(tmp_path / "run-b"), *common])
    for run in ("run-a", "run-b"):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        assert any(json.loads(line).get("steps") == 2 for line in lines), lines


# ---------------------------------------------------------------------------------------------
# The class count without a sidecar


def test_class_count_from_the_teacher_checkpoint(tmp_path, tiny_teacher):
    """No --num-classes, no sidecar: the teacher's classifier has 10 outputs, so 10 classes; a label
    outside them is refused naming shard and key."""
    rng = np.random.default_rng(0)
    url = str(tmp_path / "foreign-000000.tar")
    with wds.TarWriter(url) as sink:
        for i in range(12):
            img = encode(photo(200 + i, (36, 36)), "PNG")
            sink.write({"__key__": f"k{i:02d}", "png": img, "json": json.dumps({"y": int(rng.integers(10))}).encode()})
    args = cache_cli_args(url, tiny_teacher, tmp_path / "cache", views=2, view_block=2)
    out = _invoke([*args, "--label-key", "y"])
    assert "1 units done" in out
    g = zarr.open_group(str(tmp_path / "cache"), mode="r")
    assert g.attrs["stillroom"]["num_classes"] == 10
    with wds.TarWriter(str(tmp_path / "high-000000.tar")) as sink:
        sink.write({"__key__": "big", "png": encode(photo(1, (36, 36)), "PNG"), "json": b'{"y": 12}'})
    args = cache_cli_args(str(tmp_path / "high-000000.tar"), tiny_teacher, tmp_path / "c2", views=2, view_block=2)
    result = CliRunner().invoke(app, [*args, "--label-key", "y"])
    assert result.exit_code == 2, result.output
    assert "high-000000.tar" in result.output and "'big'" in result.output and "out of range [0, 10)" in result.output


def test_count_matches_reader_on_foreign_tars(tmp_path):
    """The header count and the reader agree on members that are not samples (meta files, no extension)."""
    url = str(tmp_path / "odd-000000.tar")
    with tarfile.open(url, "w") as tar:
        for name, data in [
            ("__meta__", b"x"),
            ("README", b"no extension"),
            ("a/s1.png", encode(photo(1, (8, 8)), "PNG")),
            ("a/s1.cls", b"0"),
            ("a/.hidden.png", b"junk"),
            ("a/s2.png", encode(photo(2, (8, 8)), "PNG")),
            ("a/s2.cls", b"1"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    [shard] = load_shard_list(url)
    assert count_samples(url) == shard.count == 2
    assert [(r.key, r.position, r.label) for r in iter_raw(shard, 0)] == [("a/s1", 0, 0), ("a/s2", 1, 1)]


def test_bad_sample_read_by_a_loader_worker_ends_in_one_line(tmp_path, tiny_teacher):
    """torch re-raises a worker's DataError with the worker's traceback in its message: the CLI still
    prints the one line naming shard and key."""
    url = str(tmp_path / "w-000000.tar")
    with wds.TarWriter(url) as sink:
        sink.write({"__key__": "good", "png": encode(photo(1, (32, 32)), "PNG"), "cls": b"1"})
        sink.write({"__key__": "junk", "png": b"not an image", "cls": b"1"})
    args = cache_cli_args(url, tiny_teacher, tmp_path / "c", views=2, view_block=2, workers=1, num_classes=10)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert url in errors[0] and "'junk'" in errors[0] and "undecodable image" in errors[0], errors[0]
