"""Shard lists: which shards a run reads, with each one's expected sample count and identity.

A shard's identity is its file's base name (mixing seeds and cache rows use it, so data may move).
Counts come from, in order: the counts given (a cache's record), a shard index (wids JSON, which
``stillroom pack`` also writes as its sidecar, or the split info file of timm's webdataset layout,
``_info.json#train``), the pack sidecar or timm's ``_info.json`` next to the shard, or a scan of the tar
headers (:func:`pipeline.shards.tars.count_samples`). Nothing here decodes an image or imports torch.
"""

from __future__ import annotations

import glob
import json
import logging
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import braceexpand
import yaml

from pipeline import storage
from pipeline.errors import DataError, StorageError
from pipeline.shards.tars import count_samples

log = logging.getLogger(__name__)

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


_INDEX_SUFFIXES = (".json", ".yaml", ".yml")
# timm's webdataset layout (timm/imagenet-1k-wds...): the split info file beside the shards, as ReaderWds
# looks for it (``_info.json``, then ``info.json``; YAML is read the same way).
_SPLIT_INFO_NAMES = ("_info.json", "info.json")


def _split_fragment(url: str) -> tuple[str, str | None]:
    """``.../_info.json#train`` -> (``.../_info.json``, ``train``): the split a split info spec names."""
    head, sep, split = url.rpartition("#")
    if sep and head.lower().endswith(_INDEX_SUFFIXES) and "/" not in split:
        return head, split
    return url, None


def _is_index(url: str) -> bool:
    return not storage.is_pipe(url) and storage.basename(_split_fragment(url)[0]).lower().endswith(_INDEX_SUFFIXES)


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
    """An index or sidecar document: JSON, or YAML for a ``.yaml``/``.yml`` split info file."""
    if storage.is_local(url) and not storage.exists(url):
        raise DataError(f"shard index {url!r} does not exist")
    as_yaml = url.lower().endswith((".yaml", ".yml"))
    try:
        data = storage.read_bytes(url)
        return yaml.safe_load(data) if as_yaml else json.loads(data)
    except (ValueError, UnicodeDecodeError, yaml.YAMLError) as e:
        kind = "YAML" if as_yaml else "JSON"
        raise DataError(f"shard index {url!r} is not valid {kind} ({str(e).splitlines()[0]})") from None
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


def _split_entries(doc: dict, split: str | None, base: str, where: str) -> list[tuple[str, int | None]]:
    """The shards of one split of timm's split info (``splits.<name>``: ``filenames``, ``shard_lengths``)."""
    splits = doc["splits"]
    if split is None and len(splits) != 1:
        raise DataError(
            f"shard index {where!r} describes the splits {sorted(splits)}: name one, e.g. {where}#{sorted(splits)[0]}"
        )
    split = split if split is not None else next(iter(splits))
    info = splits.get(split)
    if not isinstance(info, dict):
        raise DataError(f"shard index {where!r} has no split {split!r} (its splits: {sorted(splits)})")
    names, lengths = info.get("filenames"), info.get("shard_lengths")
    if not isinstance(names, list) or not isinstance(lengths, list) or len(names) != len(lengths):
        raise DataError(f"shard index {where!r} split {split!r}: needs 'filenames' and as many 'shard_lengths'")
    bad = [n for n in lengths if isinstance(n, bool) or not isinstance(n, int) or n < 0]
    if bad or not all(isinstance(n, str) for n in names):
        raise DataError(f"shard index {where!r} split {split!r}: a file name or count is not one ({bad[:1]})")
    total = info.get("num_samples")
    if total is not None and total != sum(lengths):
        raise DataError(
            f"shard index {where!r} split {split!r}: num_samples {total} but its shard_lengths sum to {sum(lengths)}"
        )
    return [(storage.join(base, n), c) for n, c in zip(names, lengths, strict=True)]


def _is_split_info(doc: Any) -> bool:
    return isinstance(doc, dict) and isinstance(doc.get("splits"), dict)


def read_index(url: str) -> list[tuple[str, int | None]]:
    """The shards listed by a shard index: a wids JSON (``wids_version``), a pack sidecar, or one split of
    the split info file of timm's webdataset layout (``_info.json#train``: JSON or YAML).

    Relative shard URLs are relative to the index's folder (or to its ``base``), as in wids and timm.
    """
    path, split = _split_fragment(url)
    doc = _load_json(path)
    base = storage.dirname(path)
    if _is_split_info(doc):
        entries = _split_entries(doc, split, base, path)
    elif split is not None:
        raise DataError(f"{url!r}: '#{split}' names a split, but {path!r} is not a split info file (no 'splits')")
    elif isinstance(doc, dict) and "wids_version" in doc:
        if doc["wids_version"] != 1:
            raise DataError(f"shard index {url!r}: wids_version {doc['wids_version']!r} is not 1")
        entries = _wids_entries(doc, base, url)
    elif isinstance(doc, dict) and isinstance(doc.get("shards"), list):  # a sidecar of an older pack
        entries = [(storage.join(base, n), c) for n, c in sidecar_counts(doc, url).items()]
    else:
        raise DataError(
            f"{url!r} is not a shard index (expected a wids index with 'wids_version' and 'shardlist', "
            "a stillroom pack sidecar, or a split info file with 'splits')"
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


def sidecar_counts(doc: dict, where: str) -> dict[str, int]:
    """Sample counts by shard name from a sidecar, a wids index (old sidecars have only ``shards``) or a split
    info file (every split's); a count that is not a whole number >= 0 is refused, naming ``where`` and the
    shard (a wrong count would misplace every cache row after it)."""
    pairs = [(s.get("url"), s.get("nsamples")) for s in _dicts(doc.get("shardlist"), where) if "url" in s]
    pairs += [(s.get("name"), s.get("count")) for s in _dicts(doc.get("shards"), where) if "name" in s]
    for info in (doc.get("splits") or {}).values() if _is_split_info(doc) else []:
        info = info if isinstance(info, dict) else {}
        pairs += zip(info.get("filenames") or [], info.get("shard_lengths") or [], strict=False)
    counts = {}
    for name, n in pairs:
        if not isinstance(name, str) or isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise DataError(f"{where}: the sample count of shard {name!r} is {n!r}, not a whole number >= 0")
        counts[storage.basename(name)] = n
    return counts


def _dicts(items: Any, where: str) -> list[dict]:
    if items is None:
        return []
    if not isinstance(items, list) or not all(isinstance(x, dict) for x in items):
        raise DataError(f"{where}: expected a list of objects per shard, got {str(items)[:80]}")
    return items


class _Sidecars:
    """Sidecars (and timm split info files) found next to shards, each looked up and read once per shard list."""

    def __init__(self) -> None:
        self.docs: dict[str, dict | None] = {}

    def _read(self, side: str) -> dict | None:
        if side not in self.docs:
            try:
                self.docs[side] = read_sidecar(side) if storage.exists(side) else None
            except (DataError, StorageError):
                raise
            except Exception:  # a pipe's target on a filesystem fsspec cannot open: no sidecar
                self.docs[side] = None
        return self.docs[side]

    def find(self, url: str) -> dict | None:
        """The pack sidecar of the shard ``url``, if there is one."""
        side = _sidecar_url(url)
        return None if not side or storage.is_pipe(side) else self._read(side)

    def split_info(self, url: str) -> tuple[dict, str] | None:
        """timm's split info file in the shard's folder (``_info.json``, else ``info.json``) and its path, if any.

        Unlike a pack sidecar, such a file was not named by anything: one that is not split info (or not
        JSON at all) is passed over, not an error.
        """
        target = storage.pipe_target(url) if storage.is_pipe(url) else url
        folder = storage.dirname(target) if target else ""
        for name in _SPLIT_INFO_NAMES if folder and not storage.is_pipe(folder) else ():
            path = storage.join(folder, name)
            try:
                doc = self._read(path)
            except DataError:
                doc = self.docs[path] = None
            if _is_split_info(doc):
                return doc, path  # type: ignore[return-value]
        return None

    def count(self, url: str) -> int | None:
        name = shard_name(url)
        doc = self.find(url)
        n = sidecar_counts(doc, _sidecar_url(url)).get(name) if doc else None
        if n is None:
            found = self.split_info(url)
            n = sidecar_counts(*found).get(name) if found else None
        return n


def num_classes_from_sidecar(url: str) -> int | None:
    """The class count recorded by ``stillroom pack`` next to a shard (local or remote), if any."""
    doc = _Sidecars().find(url)
    n = doc.get("num_classes") if doc else None
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise DataError(f"sidecar {_sidecar_url(url)!r}: num_classes is {n!r}, not a whole number >= 1")
    return n


def class_names(spec: str | Sequence[str]) -> list[str] | None:
    """The class names ``stillroom pack`` recorded for a shard list (its index, or the sidecar next to
    its first shard), in label order; ``None`` when no such record exists (shards of other tools)."""
    specs = [s.strip() for s in ([spec] if isinstance(spec, str) else spec) if s.strip()]
    if not specs:
        return None
    doc = (
        _load_json(_split_fragment(specs[0])[0]) if _is_index(specs[0]) else _Sidecars().find(expand_urls(specs[0])[0])
    )
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
