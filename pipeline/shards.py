"""Reading webdataset shards: shard lists with counts, and validated samples with positions.

Each sample keeps its shard index and its position in the shard: together they address the
sample's cache row. Bad input is never silently dropped: by default it raises
:class:`DataError` naming the shard and key; with ``on_error="skip"`` it is counted in
:class:`SkipStats` and logged.

Samples and positions (the definitions that counting and reading share):

* A tar member belongs to a sample when it is a regular file whose name splits, as webdataset
  splits it, into a key and an extension at the first dot of its base name (``a.b/c.seg.png``:
  key ``a.b/c``, extension ``seg.png``). Hidden files (a base name starting with a dot, such as
  macOS ``._c.jpg``) and webdataset's ``__meta__`` files are not part of any sample.
* A sample is a run of consecutive members with one key; an extension seen twice in a run starts a
  new sample (so two back-to-back copies of a sample are two samples).
* A sample's position is its index among the samples of its shard, and a shard's count is its
  number of samples: bad samples and duplicates included, so that skipping one leaves a gap and
  never shifts the rows after it.
* A duplicate is a sample whose key appeared earlier in the shard: an error naming both positions,
  or with ``on_error="skip"`` skipped (the first one is kept).

Counts come from, in order: the counts given (a cache's record), a shard index (wids JSON, which
``stillroom pack`` also writes as its sidecar), the pack sidecar next to the shard, or a scan of
the tar headers that seeks over member data (a few KB read per sample, locally or on object storage).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import re
import tarfile
from collections import Counter
from collections.abc import Container, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any, Literal, TypeVar

import braceexpand
from webdataset.tariterators import base_plus_ext

from . import storage
from .errors import DataError, StorageError
from .replay import DecodedSample, decode_image

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp", "gif")
OnError = Literal["raise", "skip"]
T = TypeVar("T")
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd magic
_SCAN_THREADS = 8  # remote header scans run in parallel: each is latency-bound small GETs


@dataclass(frozen=True)
class ShardInfo:
    """One shard: where it is, how many samples it must hold, and where its labels are."""

    url: str
    count: int
    label_key: str | None = None  # read labels from each sample's .json under this key (else .cls)

    @property
    def name(self) -> str:
        """Base name, used as the shard's identity in mixup seeds (stable if the data moves)."""
        return shard_name(self.url)


def shard_name(url: str) -> str:
    """A shard's identity: its file's base name, also for a ``pipe:`` command that reads the file."""
    if storage.is_pipe(url):
        target = storage.pipe_target(url)
        if target is None:
            raise DataError(
                f"shard {url!r}: cannot tell which file this pipe: command reads (no argument ending in "
                f"{', '.join(storage.TAR_SUFFIXES)}), and a shard's file name is its identity; name the file "
                "in the command, or give its path/URL or a wids index instead"
            )
        return storage.basename(target)
    return storage.basename(url)


@dataclass
class SkipStats:
    """Counts of skipped samples by reason, for the summary line and the metrics file."""

    reasons: Counter = field(default_factory=Counter)

    def skip(self, reason: str, where: str, n: int = 1) -> None:
        self.reasons[reason] += n
        log.warning("skipped %d sample(s) at %s: %s", n, where, reason)

    @property
    def total(self) -> int:
        return sum(self.reasons.values())


# ---------------------------------------------------------------------------------------------
# Shard lists


def _is_index(url: str) -> bool:
    return not storage.is_pipe(url) and storage.basename(url).lower().endswith(".json")


def _expand(spec: str | Sequence[str]) -> list[tuple[str, int | None]]:
    """``(url, count or None)`` for every shard named by ``spec``: patterns, globs and indexes."""
    specs = [s.strip() for s in ([spec] if isinstance(spec, str) else spec) if s.strip()]
    entries: list[tuple[str, int | None]] = []
    for s in specs:
        for u in braceexpand.braceexpand(s):
            if _is_index(u):
                entries.extend(read_index(u))
            elif storage.is_local(u) and any(c in u for c in "*?["):
                matches = sorted(glob.glob(u))
                if not matches:
                    raise DataError(f"shard pattern {u!r} matches no file")
                entries.extend((m, None) for m in matches)
            else:
                entries.append((u, None))
    if not entries:
        raise DataError(f"no shards in {spec!r}")
    dup = [u for u, n in Counter(u for u, _ in entries).items() if n > 1]
    if dup:
        raise DataError(f"shard list names {dup[0]!r} more than once")
    return entries


def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """Expand brace patterns (``train-{000000..000146}.tar``), local globs and indexes into URLs.

    A string is one spec (a ``pipe:`` command may hold spaces); several specs come as a list.
    Order is preserved (globs are sorted), so the shard list, and with it every cache row
    address, is deterministic.
    """
    return [u for u, _ in _expand(spec)]


def _load_json(url: str) -> Any:
    if storage.is_local(url) and not storage.exists(url):
        raise DataError(f"shard index {url!r} does not exist")
    try:
        return json.loads(storage.read_bytes(url))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"shard index {url!r} is not valid JSON ({e})") from None
    except FileNotFoundError:
        raise DataError(f"shard index {url!r} does not exist") from None


def _wids_entries(doc: dict, base: str, where: str) -> list[tuple[str, int | None]]:
    """The shards of a wids description: its ``shardlist`` and those of its ``datasets``."""
    base = doc.get("base") or base
    entries = []
    for item in doc.get("shardlist", []):
        if not isinstance(item, dict) or not isinstance(item.get("url"), str) or "nsamples" not in item:
            raise DataError(f"shard index {where!r}: shardlist entries need 'url' and 'nsamples', got {item!r}")
        n = item["nsamples"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise DataError(f"shard index {where!r}: nsamples of {item['url']!r} is {n!r}, not a count")
        entries.append((storage.join(base, item["url"]), n))
    for part in doc.get("datasets", []):
        if "source_url" in part:
            source = storage.join(base, part["source_url"])
            entries.extend(_wids_entries(_load_json(source), storage.dirname(source), source))
        else:
            entries.extend(_wids_entries(part, base, where))
    return entries


def read_index(url: str) -> list[tuple[str, int | None]]:
    """The shards listed by a shard index: a wids JSON (``wids_version``) or a pack sidecar.

    Relative shard URLs are relative to the index's folder (or to its ``base``), as in wids.
    """
    doc = _load_json(url)
    base = storage.dirname(url)
    if isinstance(doc, dict) and "wids_version" in doc:
        if doc["wids_version"] != 1:
            raise DataError(f"shard index {url!r}: wids_version {doc['wids_version']!r} is not 1")
        entries = _wids_entries(doc, base, url)
    elif isinstance(doc, dict) and isinstance(doc.get("shards"), list):  # a sidecar of an older pack
        entries = [(storage.join(base, s["name"]), int(s["count"])) for s in doc["shards"]]
    else:
        raise DataError(
            f"{url!r} is not a shard index (expected a wids index with 'wids_version' and 'shardlist', "
            "or a stillroom pack sidecar)"
        )
    if not entries:
        raise DataError(f"shard index {url!r} lists no shards")
    return entries


def _sidecar_url(url: str) -> str:
    """Where ``stillroom pack`` puts the sidecar of ``<dir>/<prefix>-NNNNNN.tar``: ``<dir>/<prefix>.json``."""
    target = storage.pipe_target(url) if storage.is_pipe(url) else url
    if not target:
        return ""
    name = storage.basename(target)
    if "-" not in name:
        return ""
    return storage.join(storage.dirname(target), name.rsplit("-", 1)[0] + ".json") or ""


def read_sidecar(url: str) -> dict:
    """A pack sidecar (local or remote): class names and, per shard, its name and sample count."""
    doc = _load_json(url)
    if not isinstance(doc, dict):
        raise DataError(f"sidecar {url!r} is not a JSON object")
    return doc


def sidecar_counts(doc: dict) -> dict[str, int]:
    """Sample counts by shard name from a sidecar or wids index (old sidecars have only ``shards``)."""
    counts = {storage.basename(s["url"]): int(s["nsamples"]) for s in doc.get("shardlist", []) if "url" in s}
    counts.update({s["name"]: int(s["count"]) for s in doc.get("shards", []) if "name" in s})
    return counts


class _Sidecars:
    """Sidecars found next to shards, each looked up and read once per shard list."""

    def __init__(self) -> None:
        self.docs: dict[str, dict | None] = {}

    def find(self, url: str) -> dict | None:
        side = _sidecar_url(url)
        if not side or storage.is_pipe(side):
            return None
        if side not in self.docs:
            try:
                self.docs[side] = read_sidecar(side) if storage.exists(side) else None
            except (DataError, StorageError):
                raise
            except Exception:  # a pipe's target on a filesystem fsspec cannot open: no sidecar
                self.docs[side] = None
        return self.docs[side]

    def count(self, url: str) -> int | None:
        doc = self.find(url)
        return sidecar_counts(doc).get(shard_name(url)) if doc else None


def num_classes_from_sidecar(url: str) -> int | None:
    """The class count recorded by ``stillroom pack`` next to a shard (local or remote), if any."""
    doc = _Sidecars().find(url)
    n = doc.get("num_classes") if doc else None
    return int(n) if n is not None else None


def class_names(spec: str | Sequence[str]) -> list[str] | None:
    """The class names ``stillroom pack`` recorded for a shard list (its index, or the sidecar next to
    its first shard), in label order; ``None`` when no such record exists (shards of other tools)."""
    specs = [s.strip() for s in ([spec] if isinstance(spec, str) else spec) if s.strip()]
    if not specs:
        return None
    doc = _load_json(specs[0]) if _is_index(specs[0]) else _Sidecars().find(expand_urls(specs[0])[0])
    names = doc.get("classes") if isinstance(doc, dict) else None
    return [str(c) for c in names] if names else None


def check_same_classes(expected: Sequence[str], found: Sequence[str], what: str) -> None:
    """Refuse labels that mean other classes: e.g. a validation split packed from a folder missing a
    class, which shifts every later label by one. Names the first class that differs."""
    if list(expected) == list(found):
        return
    pairs = zip(expected, found, strict=False)
    i = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(expected), len(found)))

    def name(names: Sequence[str]) -> str:
        return repr(names[i]) if i < len(names) else "nothing"

    gone = sorted(set(expected) - set(found))[:3]
    raise DataError(
        f"{what}: label {i} means {name(found)} there but {name(expected)} in training "
        f"({len(found)} classes vs {len(expected)}{f'; missing: {gone}' if gone else ''}); "
        "pack both splits from the same class list"
    )


def _refuse_missing(urls: list[str]) -> None:
    missing = [u for u in urls if storage.is_local(u) and not storage.exists(u)]
    if missing:
        more = f" ({len(missing) - 1} more missing, e.g. {missing[1]!r})" if len(missing) > 1 else ""
        raise DataError(f"shard {missing[0]!r} does not exist{more}")


def _refuse_shared_names(urls: list[str]) -> None:
    """Two spellings of one file (``../``, a symlink), or two files of one name (one identity)."""
    files: dict[str, str] = {}
    for url in urls:
        other = files.setdefault(storage.real_path(url), url)
        if other != url:
            raise DataError(f"shard list names one file twice: {other!r} and {url!r} (its samples would be read twice)")
    names: dict[str, str] = {}
    for url in urls:
        name = shard_name(url)
        other = names.setdefault(name, url)
        if other != url:
            raise DataError(
                f"two shards are named {name!r}: {other!r} and {url!r}; a shard's base name is its identity "
                "(mixing seeds, cache rows), so rename one"
            )


def load_shard_list(
    spec: str | Sequence[str], counts: dict[str, int] | None = None, label_key: str | None = None
) -> list[ShardInfo]:
    """Resolve shard URLs and their expected sample counts.

    Counts come from ``counts`` (e.g. a cache's recorded list), else a shard index named in
    ``spec``, else the pack sidecar next to the shard (local or remote), else a header scan of
    each tar. A local shard that does not exist is refused here, before any work, even when its
    count is known from an index that still lists it. ``label_key`` is carried on every
    :class:`ShardInfo` for the readers.
    """
    entries = _expand(spec)
    urls = [u for u, _ in entries]
    _refuse_missing(urls)
    _refuse_shared_names(urls)
    sidecars = _Sidecars()
    known: dict[str, int | None] = {}
    for url, indexed in entries:
        n = counts.get(shard_name(url)) if counts else None
        known[url] = n if n is not None else indexed if indexed is not None else sidecars.count(url)
    scanned = _scan_counts([u for u, n in known.items() if n is None])
    infos = []
    for url in urls:
        n = known[url] if known[url] is not None else scanned[url]
        if int(n) == 0:  # type: ignore[arg-type]
            # A shard with no samples is a failed pack or copy, never data; reading it "succeeds" with
            # nothing, so refuse it here, before any teacher compute, rather than train without it.
            raise DataError(f"shard {url!r} holds no samples (empty tar?)")
        infos.append(ShardInfo(url=url, count=int(n), label_key=label_key))  # type: ignore[arg-type]
    return infos


def _scan_counts(urls: list[str]) -> dict[str, int]:
    """Header-scan counts; remote scans (latency-bound small reads) run a few at a time."""
    remote = [u for u in urls if not storage.is_local(u) and not storage.is_pipe(u)]
    if len(remote) > 1:
        log.info("counting the samples of %d shards from their tar headers (no index or sidecar)", len(urls))
    threads = min(_SCAN_THREADS, len(remote))
    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            found = dict(zip(remote, pool.map(count_samples, remote), strict=True))
    else:
        found = {}
    return {u: found[u] if u in found else count_samples(u) for u in urls}


# ---------------------------------------------------------------------------------------------
# Tar members, samples and counts


def member_key(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a tar member that belongs to a sample, else None (see the module doc)."""
    if _META.match(name) or ("/" not in name and name.startswith("__") and name.endswith("__")):
        return None
    if name.rsplit("/", 1)[-1].startswith("."):
        return None
    key, ext = base_plus_ext(name)
    if key is None:
        return None
    return key, ext.lower()


def group_samples(members: Iterable[tuple[str, T]]) -> Iterator[tuple[str, dict[str, T]]]:
    """Group ``(member name, payload)`` pairs into ``(key, {extension: payload})`` samples, in tar order."""
    key, sample = "", {}
    for name, payload in members:
        parsed = member_key(name)
        if parsed is None:
            continue
        k, ext = parsed
        if sample and (k != key or ext in sample):
            yield key, sample
            sample = {}
        key = k
        sample[ext] = payload
    if sample:
        yield key, sample


def _truncated(url: str, detail: str) -> DataError:
    return DataError(f"shard {url!r}: truncated tar ({detail})")


def _scan_seekable(f: IO[bytes], size: int, url: str) -> list[str]:
    """Member names from the headers of an uncompressed tar, seeking over member data."""
    names = []
    with tarfile.open(fileobj=f, mode="r:") as tar:
        for m in tar:
            if m.isreg():
                if m.offset_data + m.size > size:
                    need = m.offset_data + m.size
                    raise _truncated(url, f"member {m.name!r} needs bytes up to {need}, the file has {size}")
                names.append(m.name)
            tar.members = []  # a long shard's TarInfos are not needed after their names
        end = tar.offset
    # tarfile ends the member loop quietly where a header should be but is cut short or missing, and
    # also at a damaged header: only a complete zero block at the final offset proves the scan saw all.
    if end + tarfile.BLOCKSIZE > size:
        raise _truncated(url, f"file ends at byte {size}, before the end-of-archive block at {end}")
    f.seek(end)
    if f.read(tarfile.BLOCKSIZE).strip(b"\0"):
        raise DataError(f"shard {url!r}: damaged tar (no valid header at byte {end}, {size - end} bytes from the end)")
    return names


def _scan_stream(f: IO[bytes], url: str) -> list[str]:
    """Member names from a compressed tar or a pipe: the whole stream is read (no way to seek)."""
    names = []
    with tarfile.open(fileobj=f, mode="r|*") as tar:
        for m in tar:
            if m.isreg():
                names.append(m.name)
        at = tar.fileobj.tell()
        if at < tar.offset + tarfile.BLOCKSIZE:
            raise _truncated(url, f"stream ends at byte {at}, before the end-of-archive block at {tar.offset}")
    return names


def count_samples(url: str) -> int:
    """Count the samples of a shard from its tar headers (no image read). Fails on a truncated tar.

    An uncompressed local or remote tar is scanned by seeking over member data: a few KB are read
    per sample. A compressed tar or a ``pipe:`` has to be streamed whole.
    """
    try:
        with storage.guard(url):
            if storage.is_pipe(url):
                with storage.open_read(url) as f:
                    names = _scan_stream(f, url)
            else:
                f, size = storage.open_ranged(url)
                with f:
                    compressed = f.read(4).startswith(_COMPRESSED)
                    f.seek(0)
                    if compressed:
                        with storage.open_read(url) as whole:
                            names = _scan_stream(whole, url)
                    else:
                        names = _scan_seekable(f, size, url)
    except FileNotFoundError:
        raise DataError(f"shard {url!r} does not exist") from None
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"shard {url!r}: cannot read tar ({e})") from e
    return sum(1 for _ in group_samples((n, None) for n in names))


# ---------------------------------------------------------------------------------------------
# Reading samples


@dataclass
class RawSample:
    key: str
    shard_index: int
    position: int
    image: bytes
    label: int

    @property
    def digest(self) -> int:
        return image_digest(self.image)


def image_digest(data: bytes) -> int:
    """A 63-bit hash of a sample's stored image bytes, never 0 (the cache's "unknown").

    Phase 1 stores it with each cache row and phase 2 compares it on every read, so shards rebuilt with
    the same keys, labels and counts but other images are caught (about 0.14 ms per 110 KB JPEG).
    """
    value = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & ((1 << 63) - 1)
    return value or 1


def _int_label(value: Any, what: str, num_classes: int | None) -> int:
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        text = value.strip()
        if not re.fullmatch(r"[+-]?\d+", text):
            raise ValueError(f"non-integer {what} {text[:20]!r}")
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"non-integer {what} {value!r:.20}")
    if value < 0 or (num_classes is not None and value >= num_classes):
        raise ValueError(f"label {value} out of range [0, {num_classes})")
    return value


def _label(sample: dict[str, bytes], label_key: str | None, num_classes: int | None) -> int:
    if label_key is None:
        if sample.get("cls") is None:
            hint = " (is the label in the .json? pass --label-key NAME)" if "json" in sample else ""
            raise ValueError(f"missing .cls{hint}")
        return _int_label(sample["cls"], ".cls", num_classes)
    if sample.get("json") is None:
        raise ValueError(f"missing .json (labels are read from its {label_key!r} field)")
    try:
        doc = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError):
        raise ValueError("invalid .json") from None
    if not isinstance(doc, dict) or label_key not in doc:
        raise ValueError(f".json has no {label_key!r} field")
    return _int_label(doc[label_key], f".json {label_key!r}", num_classes)


def _image(sample: dict[str, bytes]) -> bytes:
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        present = sorted(sample)
        raise ValueError(f"no image (.{'/.'.join(IMAGE_EXTS)}) among {present}")
    if not sample[ext]:
        raise ValueError(f"empty .{ext} file")
    return sample[ext]


def _members(stream: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """``(name, bytes)`` of the tar members that belong to samples, streaming."""
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for m in tar:
            if m.isreg() and member_key(m.name) is not None:
                data = tar.extractfile(m)
                yield m.name, data.read() if data else b""
            tar.members = []


def open_shard(url: str) -> IO[bytes]:
    """Open a shard for streaming: local path, ``pipe:`` command, or any fsspec URL."""
    if storage.is_local(url) and not storage.exists(url):
        raise DataError(f"shard {url!r} does not exist")
    try:
        with storage.guard(url):
            return storage.open_read(url)
    except (DataError, StorageError):
        raise
    except FileNotFoundError:
        raise DataError(f"shard {url!r} does not exist") from None
    except Exception as e:  # fsspec / pipe errors come in many types; name the shard whatever they are
        raise DataError(f"shard {url!r}: cannot open ({e})") from e


class _Reader:
    """The state of one pass over a shard: position, keys seen, skip accounting."""

    def __init__(
        self, shard: ShardInfo, shard_index: int, num_classes: int | None, on_error: OnError, stats: SkipStats
    ):
        self.shard, self.shard_index, self.num_classes = shard, shard_index, num_classes
        self.on_error, self.stats = on_error, stats
        self.position = 0
        self.seen: dict[str, int] = {}

    def bad(self, reason: str, key: str) -> None:
        """Skip the sample at the current position, or raise naming it."""
        where = f"shard {self.shard.url!r} key {key!r}"
        if self.on_error != "skip":
            raise DataError(f"{where}: {reason}") from None
        self.stats.skip(reason if not reason.startswith("duplicate key") else "duplicate key", where)

    def sample(self, key: str, sample: dict[str, bytes]) -> RawSample | None:
        first = self.seen.setdefault(key, self.position)
        try:
            if first != self.position:
                raise ValueError(f"duplicate key (at positions {first} and {self.position})")
            label = _label(sample, self.shard.label_key, self.num_classes)
            return RawSample(key, self.shard_index, self.position, _image(sample), label)
        except ValueError as e:
            self.bad(str(e), key)
            return None
        finally:
            self.position += 1

    def broken(self, e: Exception) -> None:
        """The tar became unreadable mid-way: raise, or skip the rest of the shard."""
        url = self.shard.url
        err = storage.storage_error(e, url)
        if err is not None:  # an unreachable store is not bad data: never skipped
            raise err from e
        msg = f"shard {url!r}: unreadable tar after {self.position} samples ({type(e).__name__}: {e})"
        if self.on_error != "skip":
            raise DataError(msg) from e
        left = max(self.shard.count - self.position, 1)
        self.stats.skip(f"unreadable tar ({type(e).__name__})", f"shard {url!r}", left)
        self.position = self.shard.count

    def finish(self) -> None:
        """Compare the samples read with the expected count: a truncated tar otherwise ends silently."""
        shard, position = self.shard, self.position
        if position == shard.count:
            return
        msg = (
            f"shard {shard.url!r}: read {position} samples, expected {shard.count} (truncated tar or wrong shard list?)"
        )
        if self.on_error != "skip" or position > shard.count:
            raise DataError(msg)
        self.stats.skip("missing from shard (truncated tar?)", f"shard {shard.url!r}", shard.count - position)


def iter_raw(
    shard: ShardInfo,
    shard_index: int,
    num_classes: int | None = None,
    on_error: OnError = "raise",
    stats: SkipStats | None = None,
) -> Iterator[RawSample]:
    """Yield validated raw samples of one shard, in tar order, with their positions.

    Labels come from ``.cls``, or from the ``.json`` field ``shard.label_key``. After the last
    sample, the number of samples read is compared with ``shard.count``.
    """
    reader = _Reader(shard, shard_index, num_classes, on_error, stats if stats is not None else SkipStats())
    stream = open_shard(shard.url)
    try:
        for key, sample in group_samples(_members(stream)):
            raw = reader.sample(key, sample)
            if raw is not None:
                yield raw
    except DataError:
        raise
    except Exception as e:
        reader.broken(e)
        return
    finally:
        stream.close()
    reader.finish()


def _stable(e: Exception) -> str:
    """An error's message without object addresses (PIL names ``<_io.BytesIO object at 0x...>``), so
    skip reasons are the same from one read to the next and can be counted together."""
    return re.sub(r"<([\w.]+) object at 0x[0-9a-f]+>", r"<\1>", str(e))


def iter_decoded(
    shard: ShardInfo,
    shard_index: int,
    num_classes: int | None = None,
    on_error: OnError = "raise",
    stats: SkipStats | None = None,
    positions: Container[int] | None = None,
) -> Iterator[DecodedSample]:
    """Like :func:`iter_raw`, with each image decoded once to RGB.

    ``positions``: decode only these (phase 2 trains a part of each shard per epoch); the others are
    still read and checked, so a bad sample is reported wherever it is.
    """
    stats = stats if stats is not None else SkipStats()
    for raw in iter_raw(shard, shard_index, num_classes, on_error, stats):
        if positions is not None and raw.position not in positions:
            continue
        try:
            image = decode_image(raw.image)
        except Exception as e:
            where = f"shard {shard.url!r} key {raw.key!r}"
            if on_error == "skip":
                stats.skip(f"undecodable image ({_stable(e)})", where)
                continue
            raise DataError(f"{where}: undecodable image ({type(e).__name__}: {_stable(e)})") from e
        yield DecodedSample(raw.key, shard_index, raw.position, image, raw.label, digest=raw.digest)
