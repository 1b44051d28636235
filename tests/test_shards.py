"""Reading shards: shard lists and counts, sample order and positions, and bad input.

Bad input is never dropped silently: by default :class:`DataError` names the shard and the key;
with ``on_error="skip"`` the sample is counted in :class:`SkipStats`, and the samples after it keep
their positions (their cache rows), so a skip leaves a gap and never shifts the rest.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import write_digits_shards
from photos import jpeg
from PIL import Image

from pipeline.errors import DataError
from pipeline.shards.decode import iter_decoded
from pipeline.shards.lists import ShardInfo, expand_urls, load_shard_list, num_classes_from_sidecar
from pipeline.shards.samples import SkipStats, iter_raw
from pipeline.shards.tars import count_samples

N = 6  # samples per hand-made shard; the bad one sits at position BAD
BAD = 2


def _jpeg(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 20), color).save(buf, format="JPEG")
    return buf.getvalue()


def _photo() -> bytes:
    return jpeg(7, (250, 187))


def good_samples() -> list[dict]:
    return [{"__key__": f"s{i:03d}", "jpg": _jpeg((40 * i, 100, 200)), "cls": str(i % 3).encode()} for i in range(N)]


def write_tar(path: Path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)
    return str(path)


def _without(sample: dict, field: str) -> dict:
    return {k: v for k, v in sample.items() if k != field}


# name -> how the sample at position BAD is spoiled, and a word the error must contain
BAD_SAMPLES = {
    "corrupt-jpeg": (lambda s: {**s, "jpg": b"\xff\xd8\xff\xe0 this is not really a jpeg"}, "undecodable"),
    # A real photo cut after its headers: opening works, only the full decode notices.
    "truncated-jpeg": (lambda s: {**s, "jpg": _photo()[: len(_photo()) * 6 // 10]}, "undecodable"),
    "zero-byte-image": (lambda s: {**s, "jpg": b""}, "empty"),
    "missing-cls": (lambda s: _without(s, "cls"), ".cls"),
    "non-integer-cls": (lambda s: {**s, "cls": b"tench"}, "non-integer"),
    "empty-cls": (lambda s: {**s, "cls": b""}, "non-integer"),
    "label-too-large": (lambda s: {**s, "cls": b"3"}, "out of range"),
    "negative-label": (lambda s: {**s, "cls": b"-1"}, "out of range"),
    "no-image": (lambda s: _without(s, "jpg"), "no image"),
}


def _spoiled_shard(tmp_path, case):
    """A good shard of N samples whose sample BAD is spoiled as ``BAD_SAMPLES[case]`` says."""
    spoil, _ = BAD_SAMPLES[case]
    samples = good_samples()
    samples[BAD] = spoil(samples[BAD])
    url = write_tar(tmp_path / f"{case}-000000.tar", samples)
    [shard] = load_shard_list(url)
    return url, shard


@pytest.mark.parametrize("case", sorted(BAD_SAMPLES))
def test_bad_sample_raises_naming_shard_and_key(tmp_path, case):
    url, shard = _spoiled_shard(tmp_path, case)
    word = BAD_SAMPLES[case][1]
    assert shard.count == N  # a bad sample is still a sample: it keeps its place in the count
    with pytest.raises(DataError) as info:
        list(iter_decoded(shard, 0, num_classes=3))
    msg = str(info.value)
    assert url in msg and "s002" in msg and word in msg, msg


@pytest.mark.parametrize("case", sorted(BAD_SAMPLES))
def test_bad_sample_skipped_is_counted_and_leaves_a_gap(tmp_path, case):
    _, shard = _spoiled_shard(tmp_path, case)
    stats = SkipStats()
    out = list(iter_decoded(shard, 4, num_classes=3, on_error="skip", stats=stats))
    assert stats.total == 1, stats.reasons
    assert [s.key for s in out] == [f"s{i:03d}" for i in range(N) if i != BAD]
    # Positions are places in the tar, not a running count of good samples: rows stay aligned.
    assert [s.position for s in out] == [i for i in range(N) if i != BAD]
    assert all(s.shard_index == 4 for s in out)
    assert [s.label for s in out] == [i % 3 for i in range(N) if i != BAD]


def test_good_shard_order_positions_and_labels(digits_shards):
    """Samples come in tar order with positions 0..n-1, the shard's index, and their .cls label."""
    shards = load_shard_list(digits_shards)
    assert [s.count for s in shards] == [40, 40, 40]
    keys = []
    for i, shard in enumerate(shards):
        raw = list(iter_raw(shard, i, num_classes=10))
        dec = list(iter_decoded(shard, i, num_classes=10))
        assert [r.position for r in raw] == list(range(40)) == [d.position for d in dec]
        assert [r.key for r in raw] == [d.key for d in dec]
        assert [r.label for r in raw] == [d.label for d in dec]
        assert all(d.shard_index == i and d.image.mode == "RGB" for d in dec)
        keys += [r.key for r in raw]
    assert keys == [f"digits-{i:05d}" for i in range(120)]  # write_digits_shards keeps source order


def test_label_range_checked_only_with_num_classes(tmp_path):
    samples = good_samples()
    samples[BAD]["cls"] = b"7"
    [shard] = load_shard_list(write_tar(tmp_path / "big-000000.tar", samples))
    assert [s.label for s in iter_raw(shard, 0)][BAD] == 7
    with pytest.raises(DataError, match="s002"):
        list(iter_raw(shard, 0, num_classes=7))


def _cut(src: str, dst: Path, fraction: float) -> str:
    data = Path(src).read_bytes()
    content = len(data.rstrip(b"\0"))  # a cut in the zero padding after the last member loses nothing
    cut = int(content * fraction) // 7 * 7  # deliberately not on a 512-byte tar block boundary
    dst.write_bytes(data[:cut])
    return str(dst)


@pytest.mark.parametrize("fraction", [0.1, 0.35, 0.5, 0.8])
def test_truncated_shard_with_sidecar_count(tmp_path, fraction):
    """A shard cut in the middle: the sidecar's count exposes it, whatever the cut."""
    pattern = write_digits_shards(tmp_path, 20, 10)
    first = pattern.replace("{000000..000001}", "000000")
    intact = list(iter_raw(load_shard_list(first)[0], 0))
    _cut(first, Path(first), fraction)
    [shard] = load_shard_list(first)  # count from train.json, written by pack
    assert shard.count == 10
    with pytest.raises(DataError) as info:
        list(iter_decoded(shard, 0, num_classes=10))
    assert first in str(info.value)
    stats = SkipStats()
    out = list(iter_decoded(shard, 0, num_classes=10, on_error="skip", stats=stats))
    assert len(out) < 10 and len(out) + stats.total == 10, (len(out), stats.reasons)
    # What was read is the untouched head of the shard, at its own positions.
    assert [(s.key, s.position) for s in out] == [(r.key, r.position) for r in intact[: len(out)]]


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95])
def test_truncated_shard_without_sidecar_is_refused(tmp_path, fraction):
    """With no recorded count, the header scan itself must notice the cut (not count short)."""
    src = write_tar(tmp_path / "whole.tar", good_samples())
    url = _cut(src, tmp_path / "cut-000000.tar", fraction)
    with pytest.raises(DataError) as info:
        count_samples(url)
    assert url in str(info.value)
    with pytest.raises(DataError, match=re.escape("cut-000000.tar")):
        load_shard_list(url)


def test_truncated_tail_padding_only_is_harmless(tmp_path):
    """Cutting only the zero padding after the end-of-archive block loses nothing."""
    src = write_tar(tmp_path / "whole.tar", good_samples())
    data = Path(src).read_bytes()
    stripped = data.rstrip(b"\0")
    end = -(-len(stripped) // 512) * 512 + 512  # the end-of-archive block is intact
    url = tmp_path / "pad-000000.tar"
    url.write_bytes(data[:end])
    assert count_samples(str(url)) == N
    assert len(list(iter_decoded(load_shard_list(str(url))[0], 0, 3))) == N


def test_sidecar_count_disagreeing_with_tar(tmp_path):
    """A shard with more or fewer samples than its recorded count is refused (wrong shard list)."""
    url = write_tar(tmp_path / "train-000000.tar", good_samples())
    for count in (N - 1, N + 2):
        shard = ShardInfo(url, count)
        for on_error in ("raise", "skip"):
            if count > N and on_error == "skip":
                stats = SkipStats()
                assert len(list(iter_decoded(shard, 0, 3, "skip", stats))) == N
                assert stats.total == 2
                continue
            with pytest.raises(DataError, match=f"read {N} samples, expected {count}"):
                list(iter_decoded(shard, 0, 3, on_error))  # type: ignore[arg-type]
    # The same through a sidecar and through explicit counts (a cache's recorded list).
    (tmp_path / "train.json").write_text(
        json.dumps({"num_classes": 3, "shards": [{"name": "train-000000.tar", "count": N + 1}]})
    )
    [shard] = load_shard_list(url)
    assert shard.count == N + 1 and num_classes_from_sidecar(url) == 3
    with pytest.raises(DataError, match=re.escape("train-000000.tar")):
        list(iter_raw(shard, 0))
    assert load_shard_list(url, counts={"train-000000.tar": N})[0].count == N


def test_empty_shard_is_refused(tmp_path):
    """A tar with no samples (a failed pack or copy) is refused up front, naming the shard."""
    good = write_tar(tmp_path / "data-000000.tar", good_samples())
    empty = write_tar(tmp_path / "data-000001.tar", [])
    with pytest.raises(DataError) as info:
        load_shard_list(str(tmp_path / "data-{000000..000001}.tar"))
    assert empty in str(info.value) and good not in str(info.value)
    # A sidecar that says a shard holds samples while its tar is empty: the read is refused.
    (tmp_path / "data.json").write_text(json.dumps({"shards": [{"name": "data-000001.tar", "count": 3}]}))
    [shard] = load_shard_list(empty)
    for on_error in ("raise", "skip"):
        stats = SkipStats()
        if on_error == "raise":
            with pytest.raises(DataError, match=re.escape("data-000001.tar")):
                list(iter_raw(shard, 0, on_error=on_error))
        else:
            assert list(iter_raw(shard, 0, on_error=on_error, stats=stats)) == []
            assert stats.total == 3


def test_zero_byte_shard_file(tmp_path):
    url = tmp_path / "zero-000000.tar"
    url.write_bytes(b"")
    with pytest.raises(DataError, match=re.escape("zero-000000.tar")):
        load_shard_list(str(url))
    stats = SkipStats()
    assert list(iter_raw(ShardInfo(str(url), 4), 0, on_error="skip", stats=stats)) == []
    assert stats.total == 4


def test_missing_shards_and_empty_patterns(tmp_path):
    write_tar(tmp_path / "have-000000.tar", good_samples())
    for spec in (
        str(tmp_path / "nothing-*.tar"),  # glob matching no file
        str(tmp_path / "have-{000000..000002}.tar"),  # brace range naming files that do not exist
        str(tmp_path / "missing-000000.tar"),
        [str(tmp_path / "have-000000.tar"), str(tmp_path / "gone-000007.tar")],
    ):
        with pytest.raises(DataError) as info:
            load_shard_list(spec)
        msg = str(info.value)
        assert "nothing-*.tar" in msg or "have-000001.tar" in msg or "missing-000000" in msg or "gone-000007" in msg
    with pytest.raises(DataError, match="no shards"):
        load_shard_list("   ")
    # A shard listed with a known count (e.g. from a cache) but gone from disk: named, even when skipping.
    for on_error in ("raise", "skip"):
        with pytest.raises(DataError, match=re.escape("gone-000003.tar")):
            list(iter_raw(ShardInfo(str(tmp_path / "gone-000003.tar"), 5), 0, on_error=on_error))


def test_shard_list_expansion_order_and_duplicates(tmp_path):
    for i in (2, 0, 1):
        write_tar(tmp_path / f"x-{i:06d}.tar", good_samples())
    base = str(tmp_path)
    by_glob = expand_urls(f"{base}/x-*.tar")
    by_brace = expand_urls(f"{base}/x-{{000000..000002}}.tar")
    assert by_glob == by_brace == [f"{base}/x-{i:06d}.tar" for i in range(3)]
    listed = expand_urls([f"{base}/x-000002.tar", f"{base}/x-000000.tar"])
    assert listed == [f"{base}/x-000002.tar", f"{base}/x-000000.tar"]  # an explicit list keeps its order
    with pytest.raises(DataError, match="more than once"):
        expand_urls([f"{base}/x-000000.tar", f"{base}/x-*.tar"])
    infos = load_shard_list(f"{base}/x-*.tar")
    assert [s.count for s in infos] == [N] * 3 and [s.name for s in infos] == [f"x-{i:06d}.tar" for i in range(3)]


def test_shard_identity_survives_a_move(tmp_path, digits_shards):
    """A shard's name (its identity in mixing seeds and cache lists) is its base name, not its folder."""
    moved = tmp_path / "elsewhere"
    shutil.copytree(Path(digits_shards).parent, moved)
    a = load_shard_list(digits_shards)
    b = load_shard_list(str(moved / Path(digits_shards).name))
    assert [s.name for s in a] == [s.name for s in b] and [s.count for s in a] == [s.count for s in b]
    assert [s.url for s in a] != [s.url for s in b]


def test_grayscale_jpeg_decodes_to_rgb(tmp_path):
    data = jpeg(3, (128, 90), "L")
    assert Image.open(io.BytesIO(data)).mode == "L"
    url = write_tar(tmp_path / "gray-000000.tar", [{"__key__": "g", "jpg": data, "cls": b"0"}])
    [s] = list(iter_decoded(load_shard_list(url)[0], 0, 1))
    assert s.image.mode == "RGB" and s.image.size == (128, 90)
    r, g, b = s.image.split()
    assert r.tobytes() == g.tobytes() == b.tobytes()


# ---------------------------------------------------------------------------------------------
# Identity: a shard's base name is its identity, so one list must not hold it twice


def test_one_file_listed_twice_through_another_spelling_is_refused(tmp_path):
    """``a/x.tar`` and ``b/../a/x.tar`` (or a symlink) are one file: its samples would be read twice per epoch."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    url = write_tar(tmp_path / "a" / "x-000000.tar", good_samples())
    other = str(tmp_path / "b" / ".." / "a" / "x-000000.tar")
    with pytest.raises(DataError) as info:
        load_shard_list([url, other])
    msg = str(info.value)
    assert url in msg and other in msg and "one file twice" in msg, msg
    (tmp_path / "b" / "link-000000.tar").symlink_to(url)
    with pytest.raises(DataError, match=r"one file twice.*link-000000"):
        load_shard_list([url, str(tmp_path / "b" / "link-000000.tar")])


def test_two_files_with_one_name_are_refused(tmp_path):
    """Two different ``train-000000.tar`` in two folders would share mixing seeds and cache rows."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = write_tar(tmp_path / "a" / "train-000000.tar", good_samples())
    second = write_tar(tmp_path / "b" / "train-000000.tar", good_samples()[:3])
    with pytest.raises(DataError) as info:
        load_shard_list(str(tmp_path / "*" / "train-000000.tar"))
    msg = str(info.value)
    assert first in msg and second in msg and "'train-000000.tar'" in msg, msg


# ---------------------------------------------------------------------------------------------
# Duplicate keys: positions and counts stay defined (see pipeline/shards/lists.py)


def _with_duplicate(tmp_path: Path, at: int, name: str) -> tuple[str, list[str]]:
    """N good samples with a copy of sample ``at`` inserted right after it, or at the end (``at < 0``)."""
    samples = good_samples()
    copy = dict(samples[abs(at)])
    if at >= 0:
        samples.insert(at + 1, copy)
    else:
        samples.append(copy)
    return write_tar(tmp_path / name, samples), [s["__key__"] for s in samples]


@pytest.mark.parametrize("at", [1, -1], ids=["back-to-back", "later"])
def test_duplicate_key_named_or_skipped_alone(tmp_path, at):
    url, keys = _with_duplicate(tmp_path, at, f"dup{at}-000000.tar")
    key = keys[abs(at)]
    first, second = abs(at), (abs(at) + 1 if at >= 0 else len(keys) - 1)
    # The copy is a sample like any other: counted, so positions after it keep their places.
    assert count_samples(url) == len(keys) == N + 1
    [shard] = load_shard_list(url)
    with pytest.raises(DataError) as info:
        list(iter_raw(shard, 0, num_classes=3))
    msg = str(info.value)
    assert url in msg and repr(key) in msg and "duplicate key" in msg and f"{first} and {second}" in msg, msg
    assert "truncated" not in msg and "unreadable" not in msg
    stats = SkipStats()
    out = list(iter_raw(shard, 0, num_classes=3, on_error="skip", stats=stats))
    assert stats.reasons == {"duplicate key": 1}
    assert [(s.key, s.position) for s in out] == [(k, i) for i, k in enumerate(keys) if i != second]


# ---------------------------------------------------------------------------------------------
# Counting reads tar headers only


def _bytes_read() -> int:
    """Bytes this process has read through system calls so far (Linux ``rchar``)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
def test_header_count_reads_headers_not_data(tmp_path):
    """A shard of 40 samples with 60 KB images: counting it reads the headers (1.5 KB a member), not 2.4 MB."""
    rng = np.random.default_rng(0)
    samples = [
        {"__key__": f"big{i:03d}", "jpg": rng.bytes(60_000 + 37 * i), "cls": b"1", "json": b'{"label": 1}'}
        for i in range(40)
    ]
    url = write_tar(tmp_path / "big-000000.tar", samples)
    size = Path(url).stat().st_size
    count_samples(url)  # warm imports
    before = _bytes_read()
    assert count_samples(url) == 40
    read = _bytes_read() - before
    members = 3 * 40
    # Per member: its header, here 3 blocks (webdataset's TarWriter adds a pax header for the float
    # mtime), and 1 byte before the next header (tarfile checks the data is there).
    assert read <= (3 * 512 + 1) * members + 4096, (read, size)
    assert read < size / 10


def test_damaged_header_is_refused_not_counted_short(tmp_path):
    """Garbage where a header should be ends tarfile's member loop quietly: the scan must not count short."""
    url = write_tar(tmp_path / "bad-000000.tar", good_samples())
    data = bytearray(Path(url).read_bytes())
    with tarfile.open(url) as tar:
        offsets = [m.offset for m in tar.getmembers()]
    at = offsets[len(offsets) // 2]
    data[at : at + 512] = b"x" * 512
    Path(url).write_bytes(bytes(data))
    with pytest.raises(DataError, match=re.escape(url)):
        count_samples(url)


def test_gzipped_shard_is_counted_and_read(tmp_path):
    """A .tar.gz cannot be seeked: it is streamed whole, and still counted and read like a plain tar."""
    import gzip

    plain = write_tar(tmp_path / "plain.tar", good_samples())
    url = tmp_path / "zipped-000000.tar.gz"
    url.write_bytes(gzip.compress(Path(plain).read_bytes()))
    [shard] = load_shard_list(str(url))
    assert shard.count == N and shard.name == "zipped-000000.tar.gz"
    assert [s.key for s in iter_decoded(shard, 0, 3)] == [f"s{i:03d}" for i in range(N)]
    cut = tmp_path / "cut-000000.tar.gz"
    cut.write_bytes(gzip.compress(Path(plain).read_bytes()[:3000]))
    with pytest.raises(DataError, match=re.escape("cut-000000.tar.gz")):
        count_samples(str(cut))
