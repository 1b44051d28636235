"""The teacher cache: a zarr v3 group laid out as ``docs/cache-format.md`` describes.

Rows are addressed by position (``row = shard_index * capacity + position``). A unit of work is
(shard, view block); each array gets exactly one chunk per unit, so one writer owns each stored
object and concurrent workers never share a chunk. The unit's completion marker (``done``) is
written only after its data chunks, and holds the unit's sample count: never the fill value, so
``write_empty_chunks`` cannot delete it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from .shards import ShardInfo

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ATTR = "stillroom"
_ARRAY_CONFIG = {"write_empty_chunks": True}  # a unit whose data equals the fill value must not vanish

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


class CacheError(RuntimeError):
    """A cache is missing, incomplete or does not match; the message names the field or unit."""


def fingerprint(meta: dict[str, Any]) -> str:
    ident = {k: meta[k] for k in FINGERPRINT_FIELDS}
    # Shard URLs may change when data moves; names and counts identify the samples.
    ident["shards"] = [{"name": s["name"], "count": s["count"]} for s in meta["shards"]]
    text = json.dumps(ident, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


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


def build_meta(
    *,
    shards: list[ShardInfo],
    capacity: int,
    num_classes: int,
    topk: int,
    temperatures: list[float],
    views: int,
    view_block: int,
    seed: int,
    recipe: dict[str, Any],
    teacher: dict[str, Any],
) -> dict[str, Any]:
    meta = {
        "format_version": FORMAT_VERSION,
        "num_classes": int(num_classes),
        "topk": int(topk),
        "temperatures": [float(t) for t in temperatures],
        "views": int(views),
        "view_block": int(view_block),
        "seed": int(seed),
        "capacity": int(capacity),
        "shards": [{"name": s.name, "url": s.url, "count": s.count} for s in shards],
        "recipe": recipe,
        "teacher": teacher,
        "index_dtype": "int16" if num_classes <= 32767 else "int32",
        "versions": library_versions(),
    }
    meta["fingerprint"] = fingerprint(meta)
    return meta


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


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


@dataclass
class Cache:
    """An opened cache group with its metadata."""

    group: zarr.Group
    meta: dict[str, Any]
    url: str

    # -- geometry -----------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return int(self.meta["capacity"])

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.meta["shards"]

    @property
    def num_blocks(self) -> int:
        return -(-int(self.meta["views"]) // int(self.meta["view_block"]))

    def block_views(self, block: int) -> range:
        b = int(self.meta["view_block"])
        return range(block * b, min((block + 1) * b, int(self.meta["views"])))

    def shard_index(self, name: str) -> int:
        for i, s in enumerate(self.shards):
            if s["name"] == name:
                return i
        raise CacheError(f"cache {self.url!r} has no shard named {name!r}")

    # -- completion ---------------------------------------------------------------------------
    def done_counts(self) -> np.ndarray:
        """``[blocks, shards]`` sample counts of finished units; -1 where not done."""
        return np.asarray(self.group["done"][:])

    def is_done(self, block: int, shard: int) -> bool:
        return int(self.group["done"][block, shard]) >= 0

    # -- writing ------------------------------------------------------------------------------
    def write_unit(
        self,
        block: int,
        shard: int,
        values: np.ndarray,
        indices: np.ndarray,
        lse: np.ndarray,
        labels: np.ndarray,
        keys: np.ndarray,
        count: int,
    ) -> None:
        """Write one unit's chunks, then its completion marker (the order is what makes resume safe)."""
        cap = self.capacity
        views = self.block_views(block)
        rows = slice(shard * cap, (shard + 1) * cap)
        vs = slice(views.start, views.stop)
        g = self.group
        g["values"][vs, rows, :] = values
        g["indices"][vs, rows, :] = indices
        g["logsumexp"][vs, rows, :] = lse
        # Every block of a shard writes the same labels/keys bytes; an atomic same-bytes overwrite is safe.
        g["labels"][rows] = labels
        g["keys"][rows] = keys
        g["done"][block, shard] = np.int32(count)

    # -- reading ------------------------------------------------------------------------------
    def read_view(self, view: int, shard: int) -> dict[str, np.ndarray]:
        """All rows of one shard for one view: one chunk read per array."""
        cap = self.capacity
        rows = slice(shard * cap, (shard + 1) * cap)
        g = self.group
        return {
            "values": np.asarray(g["values"][view, rows, :]),
            "indices": np.asarray(g["indices"][view, rows, :]),
            "logsumexp": np.asarray(g["logsumexp"][view, rows, :]),
            "labels": np.asarray(g["labels"][rows]),
            "keys": np.asarray(g["keys"][rows]),
        }

    def nbytes_stored(self) -> int:
        """Bytes on disk (local stores only; 0 elsewhere)."""
        if not _is_local(self.url):
            return 0
        total = 0
        for root, _, files in os.walk(self.url.removeprefix("file://")):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        return total


def _create_arrays(group: zarr.Group, meta: dict[str, Any]) -> None:
    v = int(meta["views"])
    b = int(meta["view_block"])
    cap = int(meta["capacity"])
    rows = cap * len(meta["shards"])
    k = int(meta["topk"])
    t = len(meta["temperatures"])
    blocks = -(-v // b)
    idx = meta["index_dtype"]
    kw = {"config": _ARRAY_CONFIG}
    group.create_array("values", shape=(v, rows, k), chunks=(b, cap, k), dtype="float16", fill_value=0, **kw)
    group.create_array("indices", shape=(v, rows, k), chunks=(b, cap, k), dtype=idx, fill_value=-1, **kw)
    group.create_array("logsumexp", shape=(v, rows, t), chunks=(b, cap, t), dtype="float32", fill_value=0, **kw)
    group.create_array("labels", shape=(rows,), chunks=(cap,), dtype="int32", fill_value=-1, **kw)
    group.create_array("keys", shape=(rows,), chunks=(cap,), dtype=str, fill_value="", **kw)
    group.create_array("done", shape=(blocks, len(meta["shards"])), chunks=(1, 1), dtype="int32", fill_value=-1)
    group.attrs[ATTR] = meta  # last: a group with attributes is a complete group


def open_cache(url: str, mode: str = "r") -> Cache:
    """Open an existing cache; raise :class:`CacheError` naming the URL if it is not one."""
    try:
        group = zarr.open_group(url, mode=mode)
    except Exception as e:  # zarr raises several types for a missing or unreadable group
        raise CacheError(f"cannot open cache {url!r}: {type(e).__name__}: {e}") from e
    meta = group.attrs.get(ATTR)
    if not meta:
        raise CacheError(f"{url!r} is not a stillroom cache (no {ATTR!r} attributes)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"cache {url!r}: format version {meta.get('format_version')} is not {FORMAT_VERSION}")
    return Cache(group=group, meta=dict(meta), url=url)


def exists(url: str) -> bool:
    try:
        open_cache(url)
        return True
    except CacheError:
        return False


def create_or_open(url: str, meta: dict[str, Any], force_new: bool = False, wait_s: float = 120.0) -> Cache:
    """Open ``url`` if it holds a cache with this fingerprint, else create it.

    Many workers may start at once: a local cache is built in a temporary sibling directory and
    renamed into place (atomic), so a worker either sees a complete cache or none. On remote
    stores the first worker creates it and the others wait for the attributes to appear.

    Raises:
        CacheError: the existing cache has another fingerprint (names the differing fields).
    """
    local = _is_local(url)
    path = url.removeprefix("file://")
    # Only a cache with other settings is replaced: retried or parallel jobs that all pass
    # --force-new must not wipe each other's finished units.
    if force_new and exists(url) and open_cache(url).meta["fingerprint"] != meta["fingerprint"]:
        log.warning("--force-new: removing the existing cache at %s (its settings differ)", url)
        if local:
            shutil.rmtree(path)
        else:
            zarr.open_group(url, mode="w")
    if not exists(url):
        if local:
            if os.path.isdir(path) and os.listdir(path) and not exists(url):  # not: another worker just made it
                raise CacheError(f"{url!r} exists but is not a stillroom cache; choose another --out")
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            _create_arrays(zarr.open_group(tmp, mode="w-"), meta)
            try:
                os.rename(tmp, path)
            except OSError:  # another worker won the race; use theirs
                shutil.rmtree(tmp, ignore_errors=True)
        else:
            try:
                _create_arrays(zarr.open_group(url, mode="w-"), meta)
            except Exception as e:  # another worker is creating it: wait for its attributes below
                log.info("cache %s is being created elsewhere (%s); waiting", url, e)
            deadline = time.monotonic() + wait_s
            while not exists(url):
                if time.monotonic() > deadline:
                    raise CacheError(f"timed out waiting for cache {url!r} to be created by another worker")
                time.sleep(0.5)
    cache = open_cache(url, mode="r+")
    if cache.meta["fingerprint"] != meta["fingerprint"]:
        diffs = diff_fields({k: meta[k] for k in FINGERPRINT_FIELDS}, cache.meta)
        raise CacheError(
            f"cache {url!r} was made with different settings: {'; '.join(diffs) or 'fingerprint differs'}. "
            "Use another --out, or --force-new to replace it."
        )
    check_versions(cache.meta)
    return cache


def check_versions(meta: dict[str, Any]) -> list[str]:
    """Warn loudly when library versions differ from the cache's: replayed pixels may drift."""
    now = library_versions()
    diffs = [f"{k}: cache {v}, here {now.get(k)}" for k, v in meta.get("versions", {}).items() if now.get(k) != v]
    if diffs:
        log.warning(
            "LIBRARY VERSIONS DIFFER FROM THE CACHE (replayed views may not match the cached "
            "teacher outputs exactly): %s",
            "; ".join(diffs),
        )
    return diffs
