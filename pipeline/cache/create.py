"""Creating and opening a cache, idempotently: any number of jobs may start at once.

Every job writes whichever array metadata is missing (never overwriting), then the group's
attributes last, so a job killed while creating the cache leaves something the next job completes,
and jobs with the same settings write the very same bytes.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import zarr
from zarr.abc.store import Store
from zarr.storage import MemoryStore

from pipeline import storage
from pipeline.cache import store as st
from pipeline.cache.access import Cache, no_metadata
from pipeline.cache.meta import ATTR, FORMAT_VERSION, CacheMeta, check_versions, diff_fields
from pipeline.cache.units import ARRAYS, MARKER, SPECS
from pipeline.errors import CacheError, StorageError
from pipeline.files import os_reason

log = logging.getLogger(__name__)

# The metadata fields that make two arrays the same layout (zarr may add or reorder others).
_LAYOUT_FIELDS = ("shape", "data_type", "chunk_grid", "chunk_key_encoding", "fill_value", "codecs")


def _create_arrays(group: zarr.Group, meta: CacheMeta) -> None:
    b, cap, rows = meta.view_block, meta.capacity, meta.rows
    for spec in SPECS:
        width = spec.width(meta)
        shape, chunks = ((meta.views, rows, width), (b, cap, width)) if spec.per_view else ((rows,), (cap,))
        dtype = str if spec.dtype(meta) == "str" else spec.dtype(meta)
        group.create_array(
            spec.name,
            shape=shape,
            chunks=chunks,
            dtype=dtype,
            fill_value=spec.fill,
            config=st.ARRAY_CONFIG,
            compressors=st.COMPRESSORS[spec.name],
        )
    # A marker never equals the fill value (its count is >= 0), and writing the fill value deletes it.
    done_shape = (meta.num_blocks, len(meta.shards), MARKER)
    group.create_array(
        "done",
        shape=done_shape,
        chunks=(1, 1, MARKER),
        dtype="int64",
        fill_value=-1,
        compressors=st.COMPRESSORS["done"],
    )


def layout(meta: CacheMeta) -> dict[str, bytes]:
    """The metadata documents zarr writes for ``meta``: the group's ``zarr.json`` and each array's.

    Built in memory, so every job with the same settings writes the very same bytes, and a job can
    compare what it finds in a store with what it would write.
    """
    mem = MemoryStore()
    _create_arrays(zarr.open_group(store=mem, mode="w-", attributes={ATTR: meta.to_attrs()}), meta)
    return {key: st.get_bytes(mem, key) or b"" for key in sorted(st.list_keys(mem, ""))}


def _inspect(store: Store) -> tuple[str, dict[str, Any] | None]:
    """What a location holds: ``("cache", attrs)``, ``("partial", None)``, ``("empty", None)`` or ``("foreign", None)``.

    Partial: what a creating job killed before writing the group's attributes leaves (a group without
    attributes and/or some of the cache's arrays, nothing else).
    """
    group = st.read_json(st.get_bytes(store, "zarr.json"))
    attrs = (group or {}).get("attributes") or {}
    if group is not None and ATTR in attrs:
        return "cache", attrs[ATTR]
    names = st.top_level(store) - {"zarr.json"}
    if attrs or (group is not None and group.get("node_type") != "group") or names - set(ARRAYS):
        return "foreign", None
    return ("partial" if group is not None or names else "empty"), None


def _layout_problems(store: Store, meta: CacheMeta) -> tuple[list[str], list[str]]:
    """Arrays whose metadata is missing, and how the present ones differ from ``meta``'s layout."""
    expected = layout(meta)
    missing, differing = [], []
    for name in ARRAYS:
        have = st.read_json(st.get_bytes(store, f"{name}/zarr.json"))
        if have is None:
            missing.append(name)
            continue
        want = json.loads(expected[f"{name}/zarr.json"])
        diffs = [f"{f} {have.get(f)!r} (expected {want[f]!r})" for f in _LAYOUT_FIELDS if have.get(f) != want[f]]
        if diffs:
            differing.append(f"array {name!r} has {', '.join(diffs)}")
    return missing, differing


def _old_version(url: str, attrs: dict[str, Any]) -> str:
    recipe = attrs.get("recipe") or {}
    pairing = (
        f"; its mixup partners were drawn in fixed windows (recipe.mix_window: {recipe['mix_window']}), "
        "now from the whole shard (recipe.repeats)"
        if "mix_window" in recipe
        else ""
    )
    version = attrs.get("format_version")
    why = (
        "pixel digests on rows that rotate with the view, so every image is checked"
        if version == 3
        else "per-unit checksums; pixel digests on every image"
    )
    return (
        f"cache {url!r} has format version {version}; this stillroom reads version {FORMAT_VERSION} only "
        f"({why}){pairing}: rebuild it with cache-teacher (another --out, or --force-new to replace it)"
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
        store = st.open_store(url, writable=mode != "r")
        kind, attrs = _inspect(store)
    except OSError as e:
        raise CacheError(f"cannot open cache {url!r}: {st.one_line(e)}") from e
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
        raise CacheError(no_metadata(url, missing[0]))
    if differing:
        raise CacheError(f"cache {url!r} is damaged: {'; '.join(differing)}")
    return Cache(group=zarr.open_group(store=store, mode=mode), meta=meta, url=url)


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
        st.put_bytes(store, f"{name}/zarr.json", docs[f"{name}/zarr.json"], overwrite=False)
    if kind == "cache":
        return
    if kind == "partial":
        log.warning("cache %s was not fully created (a job creating it stopped); completing it", url)
    group = st.read_json(st.get_bytes(store, "zarr.json"))
    # The attributes last: their presence is what makes the cache a cache for readers.
    st.put_bytes(
        store, "zarr.json", docs["zarr.json"], overwrite=group is not None and ATTR not in group.get("attributes", {})
    )


def create_or_open(url: str, meta: CacheMeta, force_new: bool = False) -> Cache:
    """Open ``url`` if it holds a cache with this fingerprint, else create it (or finish creating it).

    Raises:
        CacheError: the location holds something else, or a cache (or a half-created one) with other
            settings (names the differing fields or array).
        StorageError: it cannot be written (a full disk, a read-only folder or store), naming it.
    """
    if storage.is_local(url) and os.path.isfile(storage.local_path(url)):
        raise StorageError(f"--out {url!r} is a file, not a cache folder: name a folder (the file is left as it is)")
    try:
        return _create_or_open(url, meta, force_new)
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise StorageError(f"cache {url!r} cannot be written: {os_reason(e)}{where}") from None


def _create_or_open(url: str, meta: CacheMeta, force_new: bool) -> Cache:
    store = st.open_store(url, writable=True)
    kind, attrs = _inspect(store)
    if force_new and _settings_differ(store, kind, attrs, meta):
        log.warning("--force-new: removing the existing cache at %s (its settings differ)", url)
        st.delete_all(store)
        kind, attrs = "empty", None
    if kind == "foreign":
        raise CacheError(f"{url!r} exists but is not a stillroom cache; choose another --out")
    if kind == "cache" and attrs is not None:
        _refuse_other_settings(url, attrs, meta)
    # Units there, but no attributes: the group's zarr.json was lost (or a creator killed after some
    # unit was written). The attributes written now are this job's, not a record of those units'.
    restored = kind == "partial" and bool(st.list_keys(store, "done/c/"))
    _complete(store, url, kind, meta)
    cache = open_cache(url, mode="r+")
    if cache.meta.fingerprint != meta.fingerprint:  # another job with other settings finished it first
        _refuse_other_settings(url, cache.meta.to_attrs(), meta)
    if restored:
        log.warning(
            "cache %s had finished units but no group metadata: rewrote it from this job's settings; every "
            "finished unit is checked against them (a unit written for another teacher, seed or shard list "
            "does not match and is redone)",
            url,
        )
    cache.restored = restored
    check_versions(cache.meta)
    return cache
