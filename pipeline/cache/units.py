"""A unit of work (view block, shard): its arrays, its checksum and its completion marker.

Each array gets exactly one chunk per unit (per shard for the per-shard arrays), so one writer owns
each stored object. The marker (one ``done`` chunk holding the unit's sample count and a 64-bit
checksum of its data) is written after the data, in one object.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import numpy as np

from .meta import CacheMeta

PER_VIEW = ("values", "indices", "logsumexp")  # one chunk per unit
PER_SHARD = ("labels", "keys", "digests")  # one chunk per shard, rewritten with identical bytes by every block
ARRAYS = (*PER_VIEW, *PER_SHARD, "done")


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


def marker_chunk(count: int, checksum: int) -> np.ndarray:
    """The ``done`` chunk of a finished unit: its count and its checksum's bit pattern as int64."""
    return np.array([count, checksum], np.uint64).view(np.int64)


def unit_objects(block: int, shard: int) -> list[str]:
    """The store keys a finished unit consists of (default zarr v3 chunk key encoding)."""
    per_unit = [f"{name}/c/{block}/{shard}/0" for name in (*PER_VIEW, "done")]
    return per_unit + [f"{name}/c/{shard}" for name in PER_SHARD]
