"""An opened cache: reading and writing its units, each read checked against the unit's marker.

A missing or corrupt chunk is reported as damage naming the unit (:class:`UnitDamaged`), never read
as fill values.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np
import zarr
from zarr.abc.store import Store

from pipeline import storage
from pipeline.cache import store as st
from pipeline.cache.meta import CacheMeta
from pipeline.cache.units import (
    PER_SHARD,
    PER_VIEW,
    UnitData,
    fingerprint_bits,
    marker_chunk,
    unit_checksum,
    unit_objects,
)
from pipeline.errors import CacheError, StorageError
from pipeline.files import os_reason

log = logging.getLogger(__name__)

REDO = "run cache-teacher again with the cache's settings: it redoes damaged units"


def no_metadata(url: str, name: str) -> str:
    return (
        f"cache {url!r} is damaged: array {name!r} has no metadata ({name}/zarr.json is missing); "
        "run cache-teacher again with the cache's settings: it restores missing metadata"
    )


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
        return cls(f"cache {cache.url!r}: {what} is damaged: {why}; {REDO}", why)


@dataclass
class Cache:
    """An opened cache group with its metadata."""

    group: zarr.Group
    meta: CacheMeta
    url: str
    restored: bool = False  # the group's metadata was rewritten over existing units (create_or_open)
    _arrays: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

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
                raise CacheError(no_metadata(self.url, name)) from None
            # A runtime setting (not stored in the metadata): without it zarr would not store a chunk
            # equal to the fill value (an all-unknown digests chunk, an all-skipped shard's labels),
            # and a missing chunk is damage. Markers keep the default: writing -1 deletes one.
            self._arrays[name] = array if name == "done" else array.with_config(st.ARRAY_CONFIG)
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
            raise StorageError(f"cannot read the completion markers of cache {self.url!r}: {st.one_line(e)}") from e
        except Exception:  # one marker does not decode: find it, and keep the others
            out = np.full(done.shape, -1, np.int64)
            for b in range(done.shape[0]):
                for s in range(done.shape[1]):
                    try:
                        out[b, s] = self._read("done", (b, s, slice(None)), b, s)
                    except UnitDamaged as e:
                        log.warning("%s (treated as not done)", e)
            return out

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
            found = st.run(keys())
        except OSError as e:
            raise StorageError(f"cannot list the completion markers of cache {self.url!r}: {st.one_line(e)}") from e
        for key in found:
            parts = key.split("/")  # done/c/<block>/<shard>/0
            if len(parts) == 5 and parts[2].isdigit() and parts[3].isdigit():
                b, s = int(parts[2]), int(parts[3])
                if b < mask.shape[0] and s < mask.shape[1]:
                    mask[b, s] = True
        return mask

    def missing_units(self, blocks: Iterable[int], shards: Iterable[int]) -> list[tuple[int, int]]:
        done, shards = self.done_mask(), list(shards)
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
        fingerprint = self.meta.fingerprint
        checksum = unit_checksum(fingerprint, block, shard, count, unit)
        self.array("done")[block, shard, :] = marker_chunk(count, checksum, fingerprint)

    def invalidate(self, block: int, shard: int) -> None:
        """Mark a damaged unit not done (its marker is the fill value: zarr deletes it); read-only: one line."""
        with _writing(self, f"{self.meta.describe_unit(block, shard)} must be marked not done"):
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
        count, bits, writer = (int(np.int64(x).view(np.uint64)) for x in arrays.pop("done"))
        if count >= 1 << 63:  # -1: the fill value
            what = self.meta.describe_unit(block, shard)
            raise CacheError(f"cache {self.url!r}: {what} is not done; run cache-teacher to compute it")
        if writer != fingerprint_bits(self.meta.fingerprint):
            raise UnitDamaged.of(
                self,
                block,
                shard,
                f"it was written by another cache (fingerprint {writer:016x}..., this one "
                f"{self.meta.fingerprint[:16]}...: another teacher, seed, recipe or shard list)",
            )
        unit = UnitData(**arrays)
        if unit_checksum(self.meta.fingerprint, block, shard, count, unit) != bits:
            gone = self.absent_objects(block, shard)
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
        for name, result in zip(selection, st.run(read_all()), strict=True):
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
            raise StorageError(f"cannot read {name!r} of {what} from cache {self.url!r}: {st.one_line(e)}") from e
        if not isinstance(e, Exception):
            raise e
        # A chunk that does not decode: zstd checksum, truncation, wrong size.
        raise UnitDamaged.of(self, block, shard, f"its {name!r} chunk does not decode ({st.one_line(e)})") from e

    def keys(self, shard: int) -> np.ndarray:
        """The stored keys of one shard (not verified: use :meth:`read_block` for checked data)."""
        return self._read("keys", (self.meta.shard_rows(shard),), 0, shard)

    def labels(self, shard: int) -> np.ndarray:
        """The stored labels of one shard (-1 = not read when the cache was made; not verified, like :meth:`keys`)."""
        return self._read("labels", (self.meta.shard_rows(shard),), 0, shard)

    def digests(self, shard: int) -> np.ndarray:
        """The stored image digests of one shard (0 = unknown; not verified, like :meth:`keys`)."""
        return self._read("digests", (self.meta.shard_rows(shard),), 0, shard)

    def nbytes_stored(self) -> int:
        """Bytes stored, on disk or under the remote prefix (fsspec ``du``)."""
        return storage.tree_size(self.url)

    def absent_objects(self, block: int, shard: int) -> list[str]:
        """The stored objects of one unit that are not there (one existence check each)."""
        return [k for k in unit_objects(block, shard) if not st.exists(self.store, k)]


@contextlib.contextmanager
def _writing(cache: Cache, what: str) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        why = f"{os_reason(e)} ({e.filename})" if e.filename else os_reason(e)
        raise StorageError(f"cache {cache.url!r}: {what}, but it cannot be written: {why}") from None
