"""The teacher cache: a zarr v3 group laid out as ``docs/cache-format.md`` describes.

Rows are addressed by position (``row = shard_index * capacity + position``). A unit of work is
(view block, shard); each array gets exactly one chunk per unit, so one writer owns each stored
object and concurrent workers never share a chunk. The unit's completion marker (one ``done``
chunk holding its sample count and a 64-bit checksum of its data) is written only after its data
chunks, in one object, so a unit is either not done or done with a checksum that every reader
verifies: a missing or corrupt chunk is reported as damage naming the unit, never read as fill
values.

Creation is idempotent: every job writes whichever array metadata is missing (never overwriting),
then the group's attributes last, so a job killed while creating the cache leaves something the
next job completes.

Everything about the cache's geometry (rows of a shard, views of a block, index dtype) is answered
by :class:`CacheMeta`; nothing outside this module reads the zarr group itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import struct
from collections.abc import AsyncIterator, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.codecs import ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore, MemoryStore

from . import storage
from .errors import CacheError, StorageError
from .shards import ShardInfo

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
ATTR = "stillroom"
PER_VIEW = ("values", "indices", "logsumexp")  # one chunk per unit
PER_SHARD = ("labels", "keys", "digests")  # one chunk per shard, rewritten with identical bytes by every block
ARRAYS = (*PER_VIEW, *PER_SHARD, "done")
_ARRAY_CONFIG = {"write_empty_chunks": True}  # a unit whose data equals the fill value must not vanish
# zstd's own frame checksum: a corrupt chunk fails to decode instead of decoding to other numbers.
_COMPRESSOR = ZstdCodec(level=0, checksum=True)
# The metadata fields that make two arrays the same layout (zarr may add or reorder others).
_LAYOUT_FIELDS = ("shape", "data_type", "chunk_grid", "chunk_key_encoding", "fill_value", "codecs")
_REDO = "run cache-teacher again with the cache's settings: it redoes damaged units"
_VERIFY_THREADS = 8  # concurrent unit reads when verifying many units (object stores are latency bound)

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
    classes: tuple[str, ...] | None = None  # class names of the labels (from pack), when known; not identity

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
        if attrs.get("classes") is not None:
            values["classes"] = tuple(str(c) for c in attrs["classes"])
        return cls(**values)

    def to_attrs(self) -> dict[str, Any]:
        """The JSON stored in the group's attributes, with the fingerprint."""
        attrs = self.identity()
        attrs["shards"] = [dataclasses.asdict(s) for s in self.shards]
        attrs["versions"] = dict(self.versions)
        if self.teacher_batch_size is not None:
            attrs["teacher_batch_size"] = self.teacher_batch_size
        if self.classes is not None:
            attrs["classes"] = list(self.classes)
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
    digests: np.ndarray | None = None  # [capacity] uint64 hash of each sample's stored image bytes, 0 = unknown

    def __post_init__(self) -> None:
        if self.digests is None:
            self.digests = np.zeros(self.labels.shape, np.uint64)

    @classmethod
    def empty(cls, meta: CacheMeta, block: int) -> UnitData:
        n, cap, k, t = len(meta.block_views(block)), meta.capacity, meta.topk, len(meta.temperatures)
        return cls(
            values=np.zeros((n, cap, k), np.float16),
            indices=np.full((n, cap, k), -1, meta.index_dtype),
            logsumexp=np.zeros((n, cap, t), np.float32),
            labels=np.full((cap,), -1, np.int32),
            keys=np.full((cap,), "", dtype=object),
            digests=np.zeros((cap,), np.uint64),
        )

    def view(self, i: int) -> UnitData:
        """The ``i``-th view of this block (per-view arrays lose their leading view axis)."""
        return UnitData(
            self.values[i], self.indices[i], self.logsumexp[i], self.labels, self.keys, digests=self.digests
        )

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.indices.nbytes + self.logsumexp.nbytes


def _le_bytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()


def unit_checksum(block: int, shard: int, count: int, unit: UnitData) -> int:
    """The 64-bit checksum a unit's marker holds (``docs/cache-format.md``, "Unit checksum").

    BLAKE2b with an 8-byte digest over the unit's identity and count, then its decoded arrays in a
    fixed order, so a missing chunk (read back as fill values), a corrupt one, or a chunk of another
    unit copied in place all change it. Arrays are hashed as little-endian C-order bytes; keys as
    UTF-8 with a 4-byte length prefix each.
    """
    h = hashlib.blake2b(digest_size=8, person=b"stillroom-unit")
    h.update(struct.pack("<qqq", block, shard, count))
    for a in (unit.values, unit.indices, unit.logsumexp, unit.labels, unit.digests):
        h.update(_le_bytes(np.asarray(a)))
    for key in np.asarray(unit.keys).tolist():
        data = str(key).encode("utf-8")
        h.update(struct.pack("<I", len(data)) + data)
    return int.from_bytes(h.digest(), "little")


def _marker(count: int, checksum: int) -> np.ndarray:
    """The ``done`` chunk of a finished unit: its count and its checksum's bit pattern as int64."""
    return np.array([count, checksum], np.uint64).view(np.int64)


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


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


# -- the store, below zarr's array API: metadata documents, listings, conditional writes --------------
def _store(url: str, writable: bool) -> Store:
    if storage.is_local(url):
        return LocalStore(storage.local_path(url), read_only=not writable)
    return FsspecStore.from_url(url, read_only=not writable)


def _get(store: Store, key: str) -> bytes | None:
    buf = sync(store.get(key, prototype=default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def _put(store: Store, key: str, data: bytes, overwrite: bool) -> None:
    buf = default_buffer_prototype().buffer.from_bytes(data)
    sync(store.set(key, buf) if overwrite else store.set_if_not_exists(key, buf))


async def _collect(keys: AsyncIterator[str]) -> list[str]:
    return [k async for k in keys]


def _list(store: Store, prefix: str) -> list[str]:
    """Every stored key under ``prefix``, without the in-flight temp files of a local store."""
    return [k for k in sync(_collect(store.list_prefix(prefix))) if not k.endswith(".partial")]


def _top_level(store: Store) -> set[str]:
    return {k for k in sync(_collect(store.list_dir(""))) if not k.endswith(".partial")}


def _json(data: bytes | None) -> dict[str, Any] | None:
    return None if data is None else json.loads(data)


class UnitDamaged(CacheError):
    """A finished unit whose stored objects are missing, do not decode, or do not match its checksum.

    Constructible from its message alone, as a DataLoader worker re-raises it in the main process.
    """

    def __init__(self, message: str, why: str = ""):
        super().__init__(message)
        self.why = why or message

    @classmethod
    def of(cls, cache: Cache, block: int, shard: int, why: str) -> UnitDamaged:
        what = cache.meta.describe_unit(block, shard)
        return cls(f"cache {cache.url!r}: {what} is damaged: {why}; {_REDO}", why)


@dataclass
class Cache:
    """An opened cache group with its metadata."""

    group: zarr.Group
    meta: CacheMeta
    url: str
    _arrays: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    @property
    def is_local(self) -> bool:
        return storage.is_local(self.url)

    @property
    def store(self) -> Store:
        return self.group.store

    def shard_index(self, name: str) -> int:
        for i, s in enumerate(self.meta.shards):
            if s.name == name:
                return i
        raise CacheError(f"cache {self.url!r} has no shard named {name!r}")

    def array(self, name: str) -> zarr.Array:
        """One of the cache's arrays; its metadata is read once per opened cache."""
        if name not in self._arrays:
            try:
                array = self.group[name]
            except (KeyError, FileNotFoundError):
                raise CacheError(_no_metadata(self.url, name)) from None
            # A runtime setting (not stored in the metadata): without it zarr would not store a chunk
            # equal to the fill value (an all-unknown digests chunk, an all-skipped shard's labels),
            # and a missing chunk is damage. Markers keep the default: writing -1 deletes one.
            self._arrays[name] = array if name == "done" else array.with_config(_ARRAY_CONFIG)
        return self._arrays[name]

    # -- completion ---------------------------------------------------------------------------
    def markers(self) -> np.ndarray:
        """``[blocks, shards, 2]`` int64: (sample count, checksum bits) of each finished unit; -1 elsewhere.

        A marker that does not decode reads as not done (with a warning): the unit gets redone.
        """
        done = self.array("done")
        try:
            return np.asarray(done[...])
        except OSError as e:
            raise StorageError(f"cannot read the completion markers of cache {self.url!r}: {_one_line(e)}") from e
        except Exception:  # one marker does not decode: find it, and keep the others
            out = np.full(done.shape, -1, np.int64)
            for b in range(done.shape[0]):
                for s in range(done.shape[1]):
                    try:
                        out[b, s] = self._read("done", (b, s, slice(None)), b, s)
                    except UnitDamaged as e:
                        log.warning("%s (treated as not done)", e)
            return out

    def marker(self, block: int, shard: int) -> tuple[int, int]:
        """(sample count, checksum) of one unit; count -1 when it is not done."""
        count, bits = (int(x) for x in self._read("done", (block, shard, slice(None)), block, shard))
        return count, int(np.int64(bits).view(np.uint64))

    def done_counts(self) -> np.ndarray:
        """``[blocks, shards]`` sample counts of finished units; -1 where not done (reads every marker)."""
        return self.markers()[..., 0]

    def done_mask(self) -> np.ndarray:
        """``[blocks, shards]``: which units have a marker, from one listing of the store.

        Reading ImageNet's 38,430 markers one by one takes ~10 s on a local disk (a GET each on S3); a
        listing is ~0.1 s (39 LIST requests on S3). A marker is only claimed here: reading the unit
        verifies it (:meth:`read_block`).
        """
        mask = np.zeros(self.array("done").shape[:2], bool)

        async def keys() -> list[str]:
            return [k async for k in self.group.store.list_prefix("done/c/")]

        try:
            found = sync(keys())
        except OSError as e:
            raise StorageError(f"cannot list the completion markers of cache {self.url!r}: {_one_line(e)}") from e
        for key in found:
            parts = key.split("/")  # done/c/<block>/<shard>/0
            if len(parts) == 5 and parts[2].isdigit() and parts[3].isdigit():
                b, s = int(parts[2]), int(parts[3])
                if b < mask.shape[0] and s < mask.shape[1]:
                    mask[b, s] = True
        return mask

    def missing_units(self, blocks: Iterable[int], shards: Iterable[int]) -> list[tuple[int, int]]:
        done = self.done_mask()
        shards = list(shards)
        return [(b, s) for b in blocks for s in shards if not done[b, s]]

    # -- writing ------------------------------------------------------------------------------
    def write_unit(self, block: int, shard: int, unit: UnitData, count: int) -> None:
        """Write one unit's chunks, then its marker: count and checksum in one object, after the data."""
        rows = self.meta.shard_rows(shard)
        views = self.meta.block_views(block)
        vs = slice(views.start, views.stop)
        for name in PER_VIEW:
            self.array(name)[vs, rows, :] = getattr(unit, name)
        # Every block of a shard writes the same labels/keys/digests bytes; an atomic same-bytes overwrite is safe.
        self.array("labels")[rows] = unit.labels
        self.array("keys")[rows] = np.asarray([str(k) for k in unit.keys.tolist()])
        self.array("digests")[rows] = unit.digests
        self.array("done")[block, shard, :] = _marker(count, unit_checksum(block, shard, count, unit))

    def invalidate(self, block: int, shard: int) -> None:
        """Mark a damaged unit not done (its marker equals the fill value, so zarr deletes the object)."""
        self.array("done")[block, shard, :] = -1

    # -- reading ------------------------------------------------------------------------------
    def read_view(self, view: int, shard: int) -> UnitData:
        """All rows of one shard for one view (arrays of one view, no leading view axis), verified.

        zarr reads the whole chunk of the view's block anyway, so the block is read and checked
        against its checksum at no extra I/O, and the view is cut from it.
        """
        block = self.meta.block_of(view)
        return self.read_block(block, shard).view(view - self.meta.block_views(block).start)

    def read_block(self, block: int, shard: int) -> UnitData:
        """All views of one block for all rows of one shard: one chunk per array, checked against its marker.

        Raises:
            UnitDamaged: a chunk is missing, does not decode, or the data do not match the checksum.
            CacheError: the unit is not done. StorageError: the store cannot be read.
        """
        arrays = self._read_unit(block, shard)
        count, bits = (int(x) for x in arrays.pop("done"))
        if count < 0:
            what = self.meta.describe_unit(block, shard)
            raise CacheError(f"cache {self.url!r}: {what} is not done; run cache-teacher to compute it")
        unit = UnitData(**arrays)
        if unit_checksum(block, shard, count, unit) != int(np.int64(bits).view(np.uint64)):
            gone = self._absent(block, shard)
            why = f"{', '.join(gone)} missing" if gone else "its data do not match the checksum in its marker"
            raise UnitDamaged.of(self, block, shard, why)
        return unit

    def _read_unit(self, block: int, shard: int) -> dict[str, np.ndarray]:
        """The marker and every array of one unit, read concurrently (one round trip on an object store)."""
        rows = self.meta.shard_rows(shard)
        views = self.meta.block_views(block)
        selection: dict[str, tuple] = {name: (slice(views.start, views.stop), rows, slice(None)) for name in PER_VIEW}
        selection.update({name: (rows,) for name in PER_SHARD})
        selection["done"] = (block, shard, slice(None))
        arrays = {name: self.array(name).async_array for name in selection}

        async def read_all() -> list[Any]:
            reads = (arrays[name].getitem(sel) for name, sel in selection.items())
            return await asyncio.gather(*reads, return_exceptions=True)

        out = {}
        for name, result in zip(selection, sync(read_all()), strict=True):
            if isinstance(result, BaseException):
                self._read_error(name, result, block, shard)
            out[name] = np.asarray(result)
        return out

    def _read(self, name: str, selection: tuple, block: int, shard: int) -> np.ndarray:
        try:
            return np.asarray(self.array(name)[selection])
        except Exception as e:
            self._read_error(name, e, block, shard)

    def _read_error(self, name: str, e: BaseException, block: int, shard: int) -> NoReturn:
        """Raise the one-line error of a failed read: the store (StorageError) or a damaged chunk."""
        if isinstance(e, CacheError):
            raise e
        if isinstance(e, OSError):
            what = self.meta.describe_unit(block, shard)
            raise StorageError(f"cannot read {name!r} of {what} from cache {self.url!r}: {_one_line(e)}") from e
        if not isinstance(e, Exception):
            raise e
        # A chunk that does not decode: zstd checksum, truncation, wrong size.
        raise UnitDamaged.of(self, block, shard, f"its {name!r} chunk does not decode ({_one_line(e)})") from e

    def keys(self, shard: int) -> np.ndarray:
        """The stored keys of one shard (not verified: use :meth:`read_block` for checked data)."""
        return self._read("keys", (self.meta.shard_rows(shard),), 0, shard)

    def digests(self, shard: int) -> np.ndarray:
        """The stored image digests of one shard (0 = unknown; not verified, like :meth:`keys`)."""
        return self._read("digests", (self.meta.shard_rows(shard),), 0, shard)

    def nbytes_stored(self) -> int:
        """Bytes stored, on disk or under the remote prefix (fsspec ``du``)."""
        return storage.tree_size(self.url)

    # -- damage -------------------------------------------------------------------------------
    def unit_objects(self, block: int, shard: int) -> list[str]:
        """The store keys a finished unit consists of (default zarr v3 chunk key encoding)."""
        per_unit = [f"{name}/c/{block}/{shard}/0" for name in (*PER_VIEW, "done")]
        return per_unit + [f"{name}/c/{shard}" for name in PER_SHARD]

    def _absent(self, block: int, shard: int) -> list[str]:
        return [k for k in self.unit_objects(block, shard) if not sync(self.store.exists(k))]

    def missing_objects(self, units: Iterable[tuple[int, int]]) -> dict[tuple[int, int], list[str]]:
        """The stored objects each unit lacks, from one listing per array (cheap, even on object stores)."""
        units = list(units)
        if not units:
            return {}
        stored: set[str] = set()
        for name in ARRAYS:
            stored.update(_list(self.store, f"{name}/c/"))
        missing = {u: [k for k in self.unit_objects(*u) if k not in stored] for u in units}
        return {u: keys for u, keys in missing.items() if keys}

    def damaged_units(self, units: Iterable[tuple[int, int]], verify: bool = True) -> dict[tuple[int, int], str]:
        """Which of these finished units are damaged, and why.

        Args:
            units: (block, shard) pairs whose marker says done.
            verify: also read every unit back and check its checksum (reads the data; without it only
                the presence of each unit's objects is checked, from a listing).
        """
        units = list(units)
        found = {u: f"{', '.join(keys)} missing" for u, keys in self.missing_objects(units).items()}
        if verify:
            for name in ARRAYS:
                self.array(name)  # metadata once, before threads share the handles
            rest = [u for u in units if u not in found]
            with ThreadPoolExecutor(_VERIFY_THREADS) as pool:
                for u, why in zip(rest, pool.map(self._problem, rest), strict=True):
                    if why:
                        found[u] = why
        return found

    def _problem(self, unit: tuple[int, int]) -> str | None:
        try:
            self.read_block(*unit)
        except UnitDamaged as e:
            return e.why
        except CacheError as e:
            return str(e)
        return None

    # -- matching a training run ----------------------------------------------------------------
    def check_run(
        self, shards: Sequence[ShardInfo], recipe: dict[str, Any], seed: int, views: Iterable[int]
    ) -> list[int]:
        """Refuse a cache that does not match a training run, lacks a unit it needs or lost a stored object.

        Args:
            shards: The run's shards (names and counts must be in the cache).
            recipe: The run's augmentation recipe; seed: its view seed.
            views: Every view the run will read.

        Returns:
            The cache's shard index of each of ``shards``.

        Raises:
            CacheError: naming the differing field, the missing shard or the missing/damaged units.
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
            raise CacheError(
                f"cache {self.url!r} is incomplete: {len(missing)} unit(s) this run needs are missing: "
                f"{self._some(missing)}; run cache-teacher again to finish it"
            )
        # Cheap (a listing): a lost object fails the run now, not at the epoch that reads it.
        damaged = self.missing_objects((b, s) for b in blocks for s in sorted(set(rows)))
        if damaged:
            raise CacheError(
                f"cache {self.url!r} is damaged: {len(damaged)} unit(s) this run needs lost stored objects: "
                f"{self._some(list(damaged), damaged)}; {_REDO}"
            )
        check_versions(self.meta)
        return rows

    def _some(self, units: list[tuple[int, int]], why: dict[tuple[int, int], list[str]] | None = None) -> str:
        """The first units of a list, described (with what each lacks), and how many more."""
        parts = [
            self.meta.describe_unit(b, s) + (f" ({', '.join(why[(b, s)])} missing)" if why else "")
            for b, s in units[:8]
        ]
        more = f" and {len(units) - 8} more (see stillroom cache-status)" if len(units) > 8 else ""
        return ", ".join(parts) + more


def _create_arrays(group: zarr.Group, meta: CacheMeta) -> None:
    v, b, cap, rows = meta.views, meta.view_block, meta.capacity, meta.rows
    k, t = meta.topk, len(meta.temperatures)
    kw = {"config": _ARRAY_CONFIG, "compressors": _COMPRESSOR}
    group.create_array("values", shape=(v, rows, k), chunks=(b, cap, k), dtype="float16", fill_value=0, **kw)
    group.create_array("indices", shape=(v, rows, k), chunks=(b, cap, k), dtype=meta.index_dtype, fill_value=-1, **kw)
    group.create_array("logsumexp", shape=(v, rows, t), chunks=(b, cap, t), dtype="float32", fill_value=0, **kw)
    group.create_array("labels", shape=(rows,), chunks=(cap,), dtype="int32", fill_value=-1, **kw)
    group.create_array("keys", shape=(rows,), chunks=(cap,), dtype=str, fill_value="", **kw)
    group.create_array("digests", shape=(rows,), chunks=(cap,), dtype="uint64", fill_value=0, **kw)
    # A marker never equals the fill value (its count is >= 0), and writing the fill value deletes it.
    done_shape = (meta.num_blocks, len(meta.shards), 2)
    group.create_array(
        "done", shape=done_shape, chunks=(1, 1, 2), dtype="int64", fill_value=-1, compressors=_COMPRESSOR
    )


def layout(meta: CacheMeta) -> dict[str, bytes]:
    """The metadata documents zarr writes for ``meta``: the group's ``zarr.json`` and each array's.

    Built in memory, so every job with the same settings writes the very same bytes, and a job can
    compare what it finds in a store with what it would write.
    """
    mem = MemoryStore()
    _create_arrays(zarr.open_group(store=mem, mode="w-", attributes={ATTR: meta.to_attrs()}), meta)
    return {key: _get(mem, key) or b"" for key in sorted(_list(mem, ""))}


def _inspect(store: Store) -> tuple[str, dict[str, Any] | None]:
    """What a location holds: ``("cache", attrs)``, ``("partial", None)``, ``("empty", None)`` or ``("foreign", None)``.

    Partial: what a creating job killed before writing the group's attributes leaves (a group without
    attributes and/or some of the cache's arrays, nothing else).
    """
    group = _json(_get(store, "zarr.json"))
    attrs = (group or {}).get("attributes") or {}
    if group is not None and ATTR in attrs:
        return "cache", attrs[ATTR]
    names = _top_level(store) - {"zarr.json"}
    if attrs or (group is not None and group.get("node_type") != "group") or names - set(ARRAYS):
        return "foreign", None
    return ("partial" if group is not None or names else "empty"), None


def _layout_problems(store: Store, meta: CacheMeta) -> tuple[list[str], list[str]]:
    """Arrays whose metadata is missing, and how the present ones differ from ``meta``'s layout."""
    expected = layout(meta)
    missing, differing = [], []
    for name in ARRAYS:
        have = _json(_get(store, f"{name}/zarr.json"))
        if have is None:
            missing.append(name)
            continue
        want = json.loads(expected[f"{name}/zarr.json"])
        diffs = [f"{f} {have.get(f)!r} (expected {want[f]!r})" for f in _LAYOUT_FIELDS if have.get(f) != want[f]]
        if diffs:
            differing.append(f"array {name!r} has {', '.join(diffs)}")
    return missing, differing


def _no_metadata(url: str, name: str) -> str:
    return (
        f"cache {url!r} is damaged: array {name!r} has no metadata ({name}/zarr.json is missing); "
        "run cache-teacher again with the cache's settings: it restores missing metadata"
    )


def _old_version(url: str, attrs: dict[str, Any]) -> str:
    recipe = attrs.get("recipe") or {}
    pairing = (
        f"; its mixup partners were drawn in fixed windows (recipe.mix_window: {recipe['mix_window']}), "
        "now from the whole shard (recipe.repeats)"
        if "mix_window" in recipe
        else ""
    )
    return (
        f"cache {url!r} has format version {attrs.get('format_version')}; this stillroom reads version "
        f"{FORMAT_VERSION} only (per-unit checksums){pairing}: rebuild it with cache-teacher "
        "(another --out, or --force-new to replace it)"
    )


def open_cache(url: str, mode: str = "r") -> Cache:
    """Open an existing cache, checking its format version and every array's metadata.

    Raises:
        CacheError: naming the URL: nothing there, not a cache, half-created, another format version,
            or an array whose metadata is missing or does not match the attributes.
    """
    if storage.is_local(url) and not storage.exists(url):
        raise CacheError(f"cannot open cache {url!r}: nothing is there")
    try:
        store = _store(url, writable=mode != "r")
        kind, attrs = _inspect(store)
    except OSError as e:
        raise CacheError(f"cannot open cache {url!r}: {_one_line(e)}") from e
    if kind == "partial":
        raise CacheError(
            f"cache {url!r} was not fully created (a cache-teacher job stopped before writing its attributes); "
            "run cache-teacher with its settings to finish creating it"
        )
    if kind != "cache" or attrs is None:
        raise CacheError(f"{url!r} is not a stillroom cache (no {ATTR!r} attributes)")
    if attrs.get("format_version") != FORMAT_VERSION:
        raise CacheError(_old_version(url, attrs))
    meta = CacheMeta.from_attrs(dict(attrs))
    missing, differing = _layout_problems(store, meta)
    if missing:
        raise CacheError(_no_metadata(url, missing[0]))
    if differing:
        raise CacheError(f"cache {url!r} is damaged: {'; '.join(differing)}")
    return Cache(group=zarr.open_group(store=store, mode=mode), meta=meta, url=url)


def exists(url: str) -> bool:
    try:
        open_cache(url)
        return True
    except CacheError:
        return False


def _settings_differ(store: Store, kind: str, attrs: dict[str, Any] | None, meta: CacheMeta) -> bool:
    """Whether ``--force-new`` should replace what is there (never a foreign folder, never the same cache)."""
    if kind == "cache" and attrs is not None:
        return attrs.get("fingerprint") != meta.fingerprint or attrs.get("format_version") != FORMAT_VERSION
    return kind == "partial" and bool(_layout_problems(store, meta)[1])


def _refuse_other_settings(url: str, attrs: dict[str, Any], meta: CacheMeta) -> None:
    if attrs.get("format_version") != FORMAT_VERSION:
        raise CacheError(_old_version(url, attrs))
    if attrs.get("fingerprint") != meta.fingerprint:
        diffs = diff_fields(meta.identity(), CacheMeta.from_attrs(dict(attrs)).identity())
        raise CacheError(
            f"cache {url!r} was made with different settings: {'; '.join(diffs) or 'fingerprint differs'}. "
            "Use another --out, or --force-new to replace it."
        )


def _complete(store: Store, url: str, kind: str, meta: CacheMeta) -> None:
    """Write whichever array metadata is missing (never overwriting), then the group's attributes last.

    Every job with these settings writes identical bytes, so jobs starting at once, or a job finishing
    what a killed one began, all end with the same cache; an array another job made with other
    settings is refused, naming it.
    """
    missing, differing = _layout_problems(store, meta)
    if differing:
        raise CacheError(
            f"cache {url!r}: {'; '.join(differing)}: it was begun with other settings. "
            "Use another --out, or --force-new to replace it."
        )
    docs = layout(meta)
    for name in missing:
        if kind == "cache":
            log.warning("cache %s: array %r had no metadata; restoring it (its chunks are kept)", url, name)
        _put(store, f"{name}/zarr.json", docs[f"{name}/zarr.json"], overwrite=False)
    if kind == "cache":
        return
    if kind == "partial":
        log.warning("cache %s was not fully created (a job creating it stopped); completing it", url)
    group = _json(_get(store, "zarr.json"))
    # The attributes last: their presence is what makes the cache a cache for readers.
    _put(store, "zarr.json", docs["zarr.json"], overwrite=group is not None and ATTR not in group.get("attributes", {}))


def create_or_open(url: str, meta: CacheMeta, force_new: bool = False) -> Cache:
    """Open ``url`` if it holds a cache with this fingerprint, else create it (or finish creating it).

    Raises:
        CacheError: the location holds something else, or a cache (or a half-created one) with other
            settings (names the differing fields or array).
    """
    store = _store(url, writable=True)
    kind, attrs = _inspect(store)
    if force_new and _settings_differ(store, kind, attrs, meta):
        log.warning("--force-new: removing the existing cache at %s (its settings differ)", url)
        sync(store.delete_dir(""))
        kind, attrs = "empty", None
    if kind == "foreign":
        raise CacheError(f"{url!r} exists but is not a stillroom cache; choose another --out")
    if kind == "cache" and attrs is not None:
        _refuse_other_settings(url, attrs, meta)
    _complete(store, url, kind, meta)
    cache = open_cache(url, mode="r+")
    if cache.meta.fingerprint != meta.fingerprint:  # another job with other settings finished it first
        _refuse_other_settings(url, cache.meta.to_attrs(), meta)
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
