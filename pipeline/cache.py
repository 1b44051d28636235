"""The teacher cache: a zarr v3 group laid out as ``docs/cache-format.md`` describes.

Rows are addressed by position (``row = shard_index * capacity + position``). A unit of work is
(view block, shard); each array gets exactly one chunk per unit, so one writer owns each stored
object and concurrent workers never share a chunk. The unit's completion marker (``done``) is
written only after its data chunks, and holds the unit's sample count: never the fill value, so
``write_empty_chunks`` cannot delete it.

Everything about the cache's geometry (rows of a shard, views of a block, index dtype) is answered
by :class:`CacheMeta`; nothing outside this module reads the zarr group itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from . import storage
from .errors import CacheError
from .shards import ShardInfo

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ATTR = "stillroom"
_ARRAY_CONFIG = {"write_empty_chunks": True}  # a unit whose data equals the fill value must not vanish
_PER_VIEW = ("values", "indices", "logsumexp")

# Fields that identify what a cache holds; a different value means a different cache.
FINGERPRINT_FIELDS = (
    "format_version",
    "num_classes",
    "topk",
    "temperatures",
    "views",
    "view_block",
    "seed",
    "capacity",
    "shards",
    "recipe",
    "teacher",
    "index_dtype",
)


def index_dtype(num_classes: int) -> str:
    """The narrowest integer type that holds every class id."""
    return "int16" if num_classes <= 32767 else "int32"


def library_versions() -> dict[str, str]:
    """Versions that can change replayed pixels or teacher outputs."""
    import PIL
    import timm
    import torch
    import torchvision

    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "Pillow": PIL.__version__,
        "numpy": np.__version__,
    }


@dataclass(frozen=True)
class ShardEntry:
    """A shard as the cache records it: its name (its identity), where it was read, its sample count."""

    name: str
    url: str
    count: int


@dataclass(frozen=True)
class CacheMeta:
    """What a cache holds and how it is laid out (the group's ``stillroom`` attributes, typed)."""

    num_classes: int
    topk: int
    temperatures: tuple[float, ...]
    views: int
    view_block: int
    seed: int
    capacity: int
    shards: tuple[ShardEntry, ...]
    recipe: dict[str, Any]
    teacher: dict[str, Any]
    index_dtype: str
    versions: dict[str, str]
    format_version: int = FORMAT_VERSION
    teacher_batch_size: int | None = None

    @classmethod
    def build(cls, *, shards: Sequence[ShardInfo], num_classes: int, **fields: Any) -> CacheMeta:
        """A new cache's metadata for ``shards``, with this machine's library versions."""
        return cls(
            num_classes=int(num_classes),
            shards=tuple(ShardEntry(s.name, s.url, int(s.count)) for s in shards),
            index_dtype=index_dtype(num_classes),
            versions=library_versions(),
            **fields,
        )

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> CacheMeta:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in attrs.items() if k in names}
        values["temperatures"] = tuple(float(t) for t in attrs["temperatures"])
        values["shards"] = tuple(ShardEntry(s["name"], s["url"], int(s["count"])) for s in attrs["shards"])
        return cls(**values)

    def to_attrs(self) -> dict[str, Any]:
        """The JSON stored in the group's attributes, with the fingerprint."""
        attrs = self.identity()
        attrs["shards"] = [dataclasses.asdict(s) for s in self.shards]
        attrs["versions"] = dict(self.versions)
        if self.teacher_batch_size is not None:
            attrs["teacher_batch_size"] = self.teacher_batch_size
        attrs["fingerprint"] = self.fingerprint
        return attrs

    def identity(self) -> dict[str, Any]:
        """The fields that define what the cache holds, as JSON values."""
        out = {name: getattr(self, name) for name in FINGERPRINT_FIELDS}
        out["temperatures"] = list(self.temperatures)
        out["shards"] = [{"name": s.name, "count": s.count} for s in self.shards]
        return out

    @property
    def fingerprint(self) -> str:
        # Shard URLs may change when data moves; names and counts identify the samples.
        text = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    # -- geometry ---------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return -(-self.views // self.view_block)

    @property
    def rows(self) -> int:
        return self.capacity * len(self.shards)

    def block_views(self, block: int) -> range:
        return range(block * self.view_block, min((block + 1) * self.view_block, self.views))

    def block_of(self, view: int) -> int:
        return view // self.view_block

    def shard_rows(self, shard: int) -> slice:
        return slice(shard * self.capacity, (shard + 1) * self.capacity)

    def describe_unit(self, block: int, shard: int) -> str:
        views = self.block_views(block)
        return f"views {views.start}-{views.stop - 1} of shard {self.shards[shard].name!r}"


@dataclass
class UnitData:
    """One unit's arrays (all views of one block, all rows of one shard), as written and read."""

    values: np.ndarray  # [views, capacity, K] float16
    indices: np.ndarray  # [views, capacity, K] int16/int32
    logsumexp: np.ndarray  # [views, capacity, T] float32
    labels: np.ndarray  # [capacity] int32, -1 for an empty row
    keys: np.ndarray  # [capacity] str, "" for an empty row

    @classmethod
    def empty(cls, meta: CacheMeta, block: int) -> UnitData:
        n, cap, k, t = len(meta.block_views(block)), meta.capacity, meta.topk, len(meta.temperatures)
        return cls(
            values=np.zeros((n, cap, k), np.float16),
            indices=np.full((n, cap, k), -1, meta.index_dtype),
            logsumexp=np.zeros((n, cap, t), np.float32),
            labels=np.full((cap,), -1, np.int32),
            keys=np.full((cap,), "", dtype=object),
        )

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.indices.nbytes + self.logsumexp.nbytes


def diff_fields(expected: dict[str, Any], actual: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences, naming each differing field (``recipe.reprob: ...``)."""
    out = []
    for k in expected:
        name = f"{prefix}{k}"
        a, b = actual.get(k, "<absent>"), expected[k]
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(diff_fields(b, a, name + "."))
        elif k == "shards" and isinstance(a, list) and isinstance(b, list):
            an = [(s["name"], s["count"]) for s in a]
            bn = [(s["name"], s["count"]) for s in b]
            if an != bn:
                extra = [n for n in bn if n not in an][:3]
                gone = [n for n in an if n not in bn][:3]
                out.append(
                    f"shards: cache has {len(an)} shards, requested {len(bn)} "
                    f"(requested but not in cache: {extra}; in cache but not requested: {gone})"
                )
        elif a != b:
            out.append(f"{name}: cache has {a!r}, requested {b!r}")
    return out


@dataclass
class Cache:
    """An opened cache group with its metadata."""

    group: zarr.Group
    meta: CacheMeta
    url: str

    @property
    def is_local(self) -> bool:
        return storage.is_local(self.url)

    def shard_index(self, name: str) -> int:
        for i, s in enumerate(self.meta.shards):
            if s.name == name:
                return i
        raise CacheError(f"cache {self.url!r} has no shard named {name!r}")

    # -- completion ---------------------------------------------------------------------------
    def done_counts(self) -> np.ndarray:
        """``[blocks, shards]`` sample counts of finished units; -1 where not done."""
        return np.asarray(self.group["done"][:])

    def missing_units(self, blocks: Iterable[int], shards: Iterable[int]) -> list[tuple[int, int]]:
        done = self.done_counts()
        shards = list(shards)
        return [(b, s) for b in blocks for s in shards if done[b, s] < 0]

    # -- writing ------------------------------------------------------------------------------
    def write_unit(self, block: int, shard: int, unit: UnitData, count: int) -> None:
        """Write one unit's chunks, then its completion marker (the order is what makes resume safe)."""
        rows = self.meta.shard_rows(shard)
        views = self.meta.block_views(block)
        vs = slice(views.start, views.stop)
        g = self.group
        g["values"][vs, rows, :] = unit.values
        g["indices"][vs, rows, :] = unit.indices
        g["logsumexp"][vs, rows, :] = unit.logsumexp
        # Every block of a shard writes the same labels/keys bytes; an atomic same-bytes overwrite is safe.
        g["labels"][rows] = unit.labels
        g["keys"][rows] = np.asarray(unit.keys.astype(str))
        g["done"][block, shard] = np.int32(count)

    # -- reading ------------------------------------------------------------------------------
    def read_view(self, view: int, shard: int) -> UnitData:
        """All rows of one shard for one view (arrays of one view, no leading view axis)."""
        return self._read(slice(view, view + 1), shard, squeeze=True)

    def read_block(self, block: int, shard: int) -> UnitData:
        """All views of one block for all rows of one shard: one chunk per array."""
        views = self.meta.block_views(block)
        return self._read(slice(views.start, views.stop), shard, squeeze=False)

    def _read(self, views: slice, shard: int, squeeze: bool) -> UnitData:
        rows = self.meta.shard_rows(shard)
        g = self.group
        per_view = {name: np.asarray(g[name][views, rows, :]) for name in _PER_VIEW}
        if squeeze:
            per_view = {name: a[0] for name, a in per_view.items()}
        return UnitData(**per_view, labels=np.asarray(g["labels"][rows]), keys=np.asarray(g["keys"][rows]))

    def keys(self, shard: int) -> np.ndarray:
        return np.asarray(self.group["keys"][self.meta.shard_rows(shard)])

    def nbytes_stored(self) -> int:
        """Bytes stored, on disk or under the remote prefix (fsspec ``du``)."""
        return storage.tree_size(self.url)

    # -- matching a training run ----------------------------------------------------------------
    def check_run(
        self, shards: Sequence[ShardInfo], recipe: dict[str, Any], seed: int, views: Iterable[int]
    ) -> list[int]:
        """Refuse a cache that does not match a training run or lacks a view it needs.

        Args:
            shards: The run's shards (names and counts must be in the cache).
            recipe: The run's augmentation recipe; seed: its view seed.
            views: Every view the run will read.

        Returns:
            The cache's shard index of each of ``shards``.

        Raises:
            CacheError: naming the differing field, the missing shard or the missing units.
        """
        diffs = diff_fields({"recipe": recipe, "seed": seed}, {"recipe": self.meta.recipe, "seed": self.meta.seed})
        if diffs:
            raise CacheError(f"cache {self.url!r} does not match this training run: {'; '.join(diffs)}")
        by_name = {s.name: (i, s.count) for i, s in enumerate(self.meta.shards)}
        rows = []
        for s in shards:
            if s.name not in by_name:
                raise CacheError(f"shard {s.name!r} ({s.url}) is not in cache {self.url!r}; cache-teacher it first")
            i, n = by_name[s.name]
            if n != s.count:
                raise CacheError(f"shard {s.name!r} has {s.count} samples but cache {self.url!r} recorded {n}")
            rows.append(i)
        blocks = sorted({self.meta.block_of(v) for v in views})
        missing = self.missing_units(blocks, sorted(set(rows)))
        if missing:
            units = [self.meta.describe_unit(b, s) for b, s in missing[:8]]
            more = f" and {len(missing) - 8} more (see stillroom cache-status)" if len(missing) > 8 else ""
            raise CacheError(
                f"cache {self.url!r} is incomplete: {len(missing)} unit(s) this run needs are missing: "
                f"{', '.join(units)}{more}; run cache-teacher again to finish it"
            )
        check_versions(self.meta)
        return rows


def _create_arrays(group: zarr.Group, meta: CacheMeta) -> None:
    v, b, cap, rows = meta.views, meta.view_block, meta.capacity, meta.rows
    k, t = meta.topk, len(meta.temperatures)
    kw = {"config": _ARRAY_CONFIG}
    group.create_array("values", shape=(v, rows, k), chunks=(b, cap, k), dtype="float16", fill_value=0, **kw)
    group.create_array("indices", shape=(v, rows, k), chunks=(b, cap, k), dtype=meta.index_dtype, fill_value=-1, **kw)
    group.create_array("logsumexp", shape=(v, rows, t), chunks=(b, cap, t), dtype="float32", fill_value=0, **kw)
    group.create_array("labels", shape=(rows,), chunks=(cap,), dtype="int32", fill_value=-1, **kw)
    group.create_array("keys", shape=(rows,), chunks=(cap,), dtype=str, fill_value="", **kw)
    done_shape = (meta.num_blocks, len(meta.shards))
    group.create_array("done", shape=done_shape, chunks=(1, 1), dtype="int32", fill_value=-1)
    group.attrs[ATTR] = meta.to_attrs()  # last: a group with attributes is a complete group


def open_cache(url: str, mode: str = "r") -> Cache:
    """Open an existing cache; raise :class:`CacheError` naming the URL if it is not one."""
    try:
        group = zarr.open_group(url, mode=mode)
    except Exception as e:  # zarr raises several types for a missing or unreadable group
        raise CacheError(f"cannot open cache {url!r}: {type(e).__name__}: {e}") from e
    attrs = group.attrs.get(ATTR)
    if not attrs:
        raise CacheError(f"{url!r} is not a stillroom cache (no {ATTR!r} attributes)")
    if attrs.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"cache {url!r}: format version {attrs.get('format_version')} is not {FORMAT_VERSION}")
    return Cache(group=group, meta=CacheMeta.from_attrs(dict(attrs)), url=url)


def exists(url: str) -> bool:
    try:
        open_cache(url)
        return True
    except CacheError:
        return False


def _replace_if_different(url: str, meta: CacheMeta) -> None:
    """``--force-new``: remove an existing cache whose settings differ from ``meta``.

    A cache with the same fingerprint is kept: retried or parallel jobs that all pass --force-new
    must not wipe each other's finished units.
    """
    if not exists(url) or open_cache(url).meta.fingerprint == meta.fingerprint:
        return
    log.warning("--force-new: removing the existing cache at %s (its settings differ)", url)
    if storage.is_local(url):
        shutil.rmtree(storage.local_path(url))
    else:
        zarr.open_group(url, mode="w")


def _create(url: str, meta: CacheMeta, wait_s: float) -> None:
    """Create the cache unless another worker does it first.

    A local cache is built in a temporary sibling folder and renamed into place (atomic), so a
    worker sees a complete cache or none. On remote stores the first worker creates it and the
    others wait for its attributes to appear.
    """
    if storage.is_local(url):
        path = storage.local_path(url)
        if os.path.isdir(path) and os.listdir(path) and not exists(url):  # not: another worker just made it
            raise CacheError(f"{url!r} exists but is not a stillroom cache; choose another --out")
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        _create_arrays(zarr.open_group(tmp, mode="w-"), meta)
        try:
            os.rename(tmp, path)
        except OSError:  # another worker won the race; use theirs
            shutil.rmtree(tmp, ignore_errors=True)
        return
    try:
        _create_arrays(zarr.open_group(url, mode="w-"), meta)
    except Exception as e:  # another worker is creating it: wait for its attributes below
        log.info("cache %s is being created elsewhere (%s); waiting", url, e)
    deadline = time.monotonic() + wait_s
    while not exists(url):
        if time.monotonic() > deadline:
            raise CacheError(f"timed out waiting for cache {url!r} to be created by another worker")
        time.sleep(0.5)


def create_or_open(url: str, meta: CacheMeta, force_new: bool = False, wait_s: float = 120.0) -> Cache:
    """Open ``url`` if it holds a cache with this fingerprint, else create it.

    Raises:
        CacheError: the existing cache has another fingerprint (names the differing fields).
    """
    if force_new:
        _replace_if_different(url, meta)
    if not exists(url):
        _create(url, meta, wait_s)
    cache = open_cache(url, mode="r+")
    if cache.meta.fingerprint != meta.fingerprint:
        diffs = diff_fields(meta.identity(), cache.meta.identity())
        raise CacheError(
            f"cache {url!r} was made with different settings: {'; '.join(diffs) or 'fingerprint differs'}. "
            "Use another --out, or --force-new to replace it."
        )
    check_versions(cache.meta)
    return cache


def check_versions(meta: CacheMeta) -> list[str]:
    """Warn loudly when library versions differ from the cache's: replayed pixels may drift."""
    now = library_versions()
    diffs = [f"{k}: cache {v}, here {now.get(k)}" for k, v in meta.versions.items() if now.get(k) != v]
    if diffs:
        log.warning(
            "LIBRARY VERSIONS DIFFER FROM THE CACHE (replayed views may not match the cached "
            "teacher outputs exactly): %s",
            "; ".join(diffs),
        )
    return diffs
