"""What a cache holds: its typed metadata (:class:`CacheMeta`), its fingerprint and its geometry.

Everything about the cache's geometry (rows of a shard, views of a block, the index dtype) is
answered here; nothing outside :mod:`pipeline.cache` reads the zarr group itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.shards.lists import ShardInfo

log = logging.getLogger(__name__)

FORMAT_VERSION = 4
ATTR = "stillroom"

# Two identities, kept apart. The views: which pixels each row's targets belong to (shards and
# counts, recipe, seed, views, row geometry). Caches with equal views identity hold targets for the
# same pixels, row for row, whatever their teacher: what several-teacher training needs.
VIEW_FIELDS = ("format_version", "num_classes", "views", "view_block", "seed", "capacity", "shards", "recipe")
# The teacher: which targets (model and weights, and how its logits are reduced).
TEACHER_FIELDS = ("teacher", "topk", "topk_mass", "topk_min", "temperatures", "index_dtype")
FINGERPRINT_FIELDS = (*VIEW_FIELDS, *TEACHER_FIELDS)


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
    topk_mass: float | None = None  # per-row K: keep the fewest logits reaching this mass (None: always topk)
    topk_min: int = 1  # per-row K never below this

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
        attrs["views_fingerprint"] = self.views_fingerprint
        attrs["teacher_fingerprint"] = self.teacher_fingerprint
        attrs["fingerprint"] = self.fingerprint
        return attrs

    def identity(self) -> dict[str, Any]:
        """The fields that define what the cache holds, as JSON values."""
        out = {name: getattr(self, name) for name in FINGERPRINT_FIELDS}
        out["temperatures"] = list(self.temperatures)
        # Shard URLs may change when data moves; names and counts identify the samples.
        out["shards"] = [{"name": s.name, "count": s.count} for s in self.shards]
        return out

    def views_identity(self) -> dict[str, Any]:
        return {k: v for k, v in self.identity().items() if k in VIEW_FIELDS}

    def teacher_identity(self) -> dict[str, Any]:
        return {k: v for k, v in self.identity().items() if k in TEACHER_FIELDS}

    @property
    def views_fingerprint(self) -> str:
        """SHA-256 of the views identity: equal for caches of the same pixels, row for row."""
        return _digest(self.views_identity())

    @property
    def teacher_fingerprint(self) -> str:
        return _digest(self.teacher_identity())

    @property
    def fingerprint(self) -> str:
        """SHA-256 of both identities: what every unit's checksum binds (``docs/cache-format.md``)."""
        return _digest({"views": self.views_fingerprint, "teacher": self.teacher_fingerprint})

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


def _digest(doc: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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


def replay_mismatch(meta: CacheMeta, where: str, ours: int, theirs: int) -> str:
    """The one-line refusal when this environment replays other pixels than phase 1 did."""
    now = library_versions()
    diffs = [f"{k} {v} (cache) vs {now.get(k)} (here)" for k, v in meta.versions.items() if now.get(k) != v]
    why = (
        f"library versions differ: {'; '.join(diffs)}"
        if diffs
        else "the library versions are equal, so another build (libjpeg, Pillow, torch) or CPU path decodes "
        "or resamples differently"
    )
    return (
        f"{where}: this environment replays other pixels than the cache's teacher saw (pixel digest "
        f"{ours:08x}, cache {theirs:08x}); {why}. Train where the cache was made, or cache again here"
    )
