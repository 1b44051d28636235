"""The teacher cache: a zarr v3 group laid out as ``docs/cache-format.md`` describes.

Modules, lowest first: :mod:`.meta` (what a cache holds, its fingerprint and geometry), :mod:`.units`
(a unit's arrays, checksum and marker), :mod:`.store` (metadata documents, listings, conditional
writes), :mod:`.access` (an opened cache: reading and writing units), :mod:`.damage` (finding
damaged units), :mod:`.create` (creating and opening) and :mod:`.match` (matching a training run).
"""

from pipeline.cache.access import Cache, UnitDamaged
from pipeline.cache.create import create_or_open, open_cache
from pipeline.cache.damage import damaged_units, missing_objects
from pipeline.cache.match import check_run
from pipeline.cache.meta import (
    FORMAT_VERSION,
    CacheMeta,
    ShardEntry,
    check_versions,
    diff_fields,
    library_versions,
    replay_mismatch,
)
from pipeline.cache.units import ARRAYS, PER_SHARD, PER_VIEW, UnitData, unit_checksum, unit_objects

__all__ = [
    "ARRAYS",
    "FORMAT_VERSION",
    "PER_SHARD",
    "PER_VIEW",
    "Cache",
    "CacheMeta",
    "ShardEntry",
    "UnitDamaged",
    "UnitData",
    "check_run",
    "check_versions",
    "create_or_open",
    "damaged_units",
    "diff_fields",
    "library_versions",
    "missing_objects",
    "open_cache",
    "replay_mismatch",
    "unit_checksum",
    "unit_objects",
]
