"""A unit of work (view block, shard): its arrays, its checksum and its completion marker.

Each array gets exactly one chunk per unit (per shard for the per-shard arrays), so one writer owns
each stored object. The marker (one ``done`` chunk holding the unit's sample count and a 64-bit
checksum of its data) is written after the data, in one object.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.cache.meta import CacheMeta


@dataclass(frozen=True)
class ArraySpec:
    """One array of the cache: per view (``[V, rows, width]``, a chunk per unit) or per shard (``[rows]``).

    The cache's layout, a unit's buffers, its checksum and its store keys all follow :data:`SPECS`, so
    a new teacher output (e.g. a feature a loss needs) is one entry here, one field of :class:`UnitData`
    and its computation in :func:`pipeline.models.targets.teacher_outputs` (``docs/architecture.md``).
    """

    name: str
    per_view: bool
    dtype: Callable[[CacheMeta], str]
    width: Callable[[CacheMeta], int]
    fill: Any

    def shape(self, meta: CacheMeta, views: int) -> tuple[int, ...]:
        """The unit's buffer shape (``views`` views of one block, or the shard's rows)."""
        return (views, meta.capacity, self.width(meta)) if self.per_view else (meta.capacity,)


SPECS = (
    ArraySpec("values", True, lambda m: "float16", lambda m: m.topk, 0),
    ArraySpec("indices", True, lambda m: m.index_dtype, lambda m: m.topk, -1),
    ArraySpec("logsumexp", True, lambda m: "float32", lambda m: len(m.temperatures), 0),
    # digest of the replayed pixels of the rows phase 1 checks (pipeline.views.pixels.checked_row), 0 elsewhere
    ArraySpec("pixel_digests", True, lambda m: "uint32", lambda m: 1, 0),
    ArraySpec("labels", False, lambda m: "int32", lambda m: 0, -1),
    ArraySpec("keys", False, lambda m: "str", lambda m: 0, ""),
    ArraySpec("digests", False, lambda m: "uint64", lambda m: 0, 0),
)
PER_VIEW = tuple(s.name for s in SPECS if s.per_view)  # one chunk per unit
PER_SHARD = tuple(s.name for s in SPECS if not s.per_view)  # one chunk per shard, the same bytes from every block
ARRAYS = (*PER_VIEW, *PER_SHARD, "done")


@dataclass
class UnitData:
    """One unit's arrays (all views of one block, all rows of one shard), as written and read."""

    values: np.ndarray  # [views, capacity, K] float16; unused columns of a per-row K: 0
    indices: np.ndarray  # [views, capacity, K] int16/int32; -1 where unused
    logsumexp: np.ndarray  # [views, capacity, T] float32
    pixel_digests: np.ndarray  # [views, capacity, 1] uint32, 0 = not checked
    labels: np.ndarray  # [capacity] int32, -1 for an empty row
    keys: np.ndarray  # [capacity] str, "" for an empty row
    digests: np.ndarray  # [capacity] uint64 hash of each sample's stored image bytes, 0 = unknown

    @classmethod
    def empty(cls, meta: CacheMeta, block: int) -> UnitData:
        views = len(meta.block_views(block))
        arrays = {}
        for spec in SPECS:
            dtype = object if spec.dtype(meta) == "str" else spec.dtype(meta)
            arrays[spec.name] = np.full(spec.shape(meta, views), spec.fill, dtype=dtype)
        return cls(**arrays)

    def view(self, i: int) -> UnitData:
        """The ``i``-th view of this block (per-view arrays lose their leading view axis)."""
        return UnitData(**{s.name: getattr(self, s.name)[i] if s.per_view else getattr(self, s.name) for s in SPECS})

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, name).nbytes for name in PER_VIEW)


def _le_bytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()


def unit_checksum(fingerprint: str, block: int, shard: int, count: int, unit: UnitData) -> int:
    """The 64-bit checksum a unit's marker holds (``docs/cache-format.md``, "Unit checksum").

    BLAKE2b with an 8-byte digest over the cache's fingerprint (both identities: views and teacher),
    the unit's place and count, then its decoded arrays in :data:`SPECS` order. So a missing chunk
    (read back as fill values), a corrupt one, a chunk of another unit copied in place, or a whole
    unit of another cache (another teacher or seed, adopted after the group's metadata was lost) all
    change it. Arrays are hashed as little-endian C-order bytes; keys as UTF-8 with a 4-byte length
    prefix each.
    """
    h = hashlib.blake2b(digest_size=8, person=b"stillroom-unit")
    h.update(fingerprint.encode("ascii"))
    h.update(struct.pack("<qqq", block, shard, count))
    for spec in SPECS:
        if spec.name != "keys":
            h.update(_le_bytes(np.asarray(getattr(unit, spec.name))))
    for key in np.asarray(unit.keys).tolist():
        data = str(key).encode("utf-8")
        h.update(struct.pack("<I", len(data)) + data)
    return int.from_bytes(h.digest(), "little")


MARKER = 3  # int64 per marker: sample count, checksum, the writer's fingerprint (first 8 bytes)


def fingerprint_bits(fingerprint: str) -> int:
    """The first 8 bytes of a fingerprint, as the marker stores them."""
    return int(fingerprint[:16], 16)


def marker_chunk(count: int, checksum: int, fingerprint: str) -> np.ndarray:
    """The ``done`` chunk of a finished unit: its count, its checksum and the fingerprint of the cache that
    wrote it (so a unit of another cache is named as such), as int64 bit patterns."""
    return np.array([count, checksum, fingerprint_bits(fingerprint)], np.uint64).view(np.int64)


def unit_objects(block: int, shard: int) -> list[str]:
    """The store keys a finished unit consists of (default zarr v3 chunk key encoding)."""
    per_unit = [f"{name}/c/{block}/{shard}/0" for name in (*PER_VIEW, "done")]
    return per_unit + [f"{name}/c/{shard}" for name in PER_SHARD]
