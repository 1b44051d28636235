"""Finding damaged units: objects missing (a listing) or data that do not match the marker (a read)."""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from pipeline.cache import store as st
from pipeline.cache.access import Cache, UnitDamaged
from pipeline.cache.units import ARRAYS, unit_objects
from pipeline.errors import CacheError

_VERIFY_THREADS = 8  # concurrent unit reads when verifying many units (object stores are latency bound)


def missing_objects(cache: Cache, units: Iterable[tuple[int, int]]) -> dict[tuple[int, int], list[str]]:
    """The stored objects each unit lacks, from one listing per array (cheap, even on object stores)."""
    units = list(units)
    if not units:
        return {}
    stored: set[str] = set()
    for name in ARRAYS:
        stored.update(st.list_keys(cache.store, f"{name}/c/"))
    missing = {u: [k for k in unit_objects(*u) if k not in stored] for u in units}
    return {u: keys for u, keys in missing.items() if keys}


def damaged_units(cache: Cache, units: Iterable[tuple[int, int]], verify: bool = True) -> dict[tuple[int, int], str]:
    """Which of these finished units are damaged, and why.

    Args:
        units: (block, shard) pairs whose marker says done.
        verify: also read every unit back and check its checksum (reads the data; without it only
            the presence of each unit's objects is checked, from a listing).
    """
    units = list(units)
    found = {u: f"{', '.join(keys)} missing" for u, keys in missing_objects(cache, units).items()}
    if verify:
        for name in ARRAYS:
            cache.array(name)  # metadata once, before threads share the handles
        rest = [u for u in units if u not in found]
        with ThreadPoolExecutor(_VERIFY_THREADS) as pool:
            for u, why in zip(rest, pool.map(lambda unit: _problem(cache, unit), rest), strict=True):
                if why:
                    found[u] = why
    return found


def _problem(cache: Cache, unit: tuple[int, int]) -> str | None:
    try:
        cache.read_block(*unit)
    except UnitDamaged as e:
        return e.why
    except CacheError as e:
        return str(e)
    return None
