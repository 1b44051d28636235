"""``stillroom verify-cache``: prove a cache right for its shards and teacher: every unit's checksum, every
key, label and image digest, the replayed pixels of every image (in the view whose row holds its digest),
then the live teacher on random replayed views, at least one per shard."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.cache import Cache, CacheMeta, UnitData, damaged_units, open_cache, replay_mismatch
from pipeline.cache.meta import check_versions
from pipeline.config import checked
from pipeline.errors import CacheError
from pipeline.models.build import autocast, resolve_device
from pipeline.models.targets import reduction_of, soft_target_probs, teacher_outputs
from pipeline.models.teacher import TeacherWeights, is_recorded, load_teacher, recorded_weights
from pipeline.options import VerifyConfig
from pipeline.shards.decode import DecodedSample, iter_decoded
from pipeline.shards.lists import ShardInfo, load_shard_list
from pipeline.shards.samples import iter_raw
from pipeline.views.pixels import check_offset, check_period, checked_row, pixel_digest, stack_views
from pipeline.views.recipe import Recipe, make_recipe
from pipeline.views.replay import View, mixed_views


def _check_samples(cache: Cache, shards: list[ShardInfo], skip: set[int]) -> tuple[list[str], set[tuple[int, int]]]:
    """Compare every stored key, label and image digest with the shards' (their bytes are read, not decoded),
    and find samples read when the cache was made that cannot be read now; returns the problems and those
    samples' (shard, position).

    Shards in ``skip`` (with a damaged unit, already reported) are left out: their rows may be the damage.
    """
    problems, unread = [], set()
    done = cache.done_mask()
    for shard in shards:
        s = cache.shard_index(shard.name)
        if s in skip or not done[:, s].any():
            continue
        keys, labels, digests = cache.keys(s), cache.labels(s), cache.digests(s)
        seen, relabelled = set(), []
        for raw in iter_raw(shard, s, cache.meta.num_classes, on_error="skip"):
            p = raw.position
            seen.add(p)
            if keys[p] != raw.key:
                problems.append(f"shard {shard.name!r} position {p}: cache key {keys[p]!r}, shard key {raw.key!r}")
                break
            if labels[p] >= 0 and labels[p] != raw.label:
                relabelled.append(f"key {raw.key!r}: shard {raw.label}, cache {int(labels[p])}")
            if digests[p] and int(digests[p]) != raw.digest:
                problems.append(f"shard {shard.name!r} key {raw.key!r}: image bytes differ from the cached sample's")
                break
        else:
            lost = [p for p in range(shard.count) if p not in seen and labels[p] >= 0]
            unread.update((s, p) for p in lost)
            if lost:
                problems.append(
                    f"shard {shard.name!r}: {len(lost)} sample(s) read when the cache was made cannot be read now "
                    f"(first at position {lost[0]})"
                )
        if relabelled:
            problems.append(
                f"shard {shard.name!r}: {len(relabelled)} of {shard.count} labels differ from the cache's "
                f"({relabelled[0]}); the shard's labels changed after caching: cache it again"
            )
    return problems, unread


def _integrity(cache: Cache) -> tuple[list[str], set[tuple[int, int]], int]:
    """Every finished unit's objects and checksum (no teacher): problems, damaged units, units checked."""
    done = cache.done_mask()
    finished = [(int(b), int(s)) for b, s in np.argwhere(done)]
    damaged = damaged_units(cache, finished, verify=True)
    problems = [f"{cache.meta.describe_unit(b, s)} is damaged: {why}" for (b, s), why in sorted(damaged.items())]
    if len(problems) > 20:
        problems = [*problems[:20], f"... and {len(problems) - 20} more damaged units"]
    if damaged:
        problems.append("run cache-teacher again with the cache's settings: it redoes damaged units")
    if not done.all():
        problems.append(f"{int((~done).sum())} of {done.size} units are not done")
    return problems, set(damaged), len(finished)


@dataclass
class _Agreement:
    """Running comparison of cached and live targets, and of replayed pixels with phase 1's digests."""

    checked: int = 0
    top1: int = 0
    overlap: int = 0
    kept: int = 0
    max_diff: float = 0.0
    kl: dict[float, list[float]] = field(default_factory=lambda: defaultdict(list))
    pixels_checked: int = 0
    pixel_mismatches: list[str] = field(default_factory=list)
    images_unchecked: int = 0
    undecodable: dict[str, list[int]] = field(default_factory=dict)  # read when cached, not decodable here
    shards: set[int] = field(default_factory=set)  # shards with a (sample, view) run through the live teacher

    def add(self, cached: dict[str, np.ndarray], live: dict[str, np.ndarray]) -> None:
        valid = cached["indices"] >= 0
        self.checked += 1
        self.top1 += int(cached["indices"][0] == live["indices"][0])
        self.overlap += len(set(cached["indices"][valid].tolist()) & set(live["indices"][valid].tolist()))
        self.kept += int(valid.sum())
        diff = np.abs(cached["values"][valid].astype(np.float32) - live["values"][valid])
        self.max_diff = max(self.max_diff, float(diff.max()))


def _intact_blocks(cache: Cache, shards: list[ShardInfo], damaged: set[tuple[int, int]]) -> dict[int, list[int]]:
    """The finished, intact view blocks of each cache shard among ``shards``."""
    done = cache.done_mask()
    names = {s.name for s in shards}
    out: dict[int, list[int]] = {}
    for s, entry in enumerate(cache.meta.shards):
        blocks = [b for b in range(done.shape[0]) if done[b, s] and (b, s) not in damaged]
        if entry.name in names and blocks:
            out[s] = blocks
    return out


def _pick(cache: Cache, intact: dict[int, list[int]], n: int | None, seed: int) -> dict[int, dict[int, set[int]]]:
    """Random (shard, view, position) triples among intact finished units, by shard and view: one in every
    shard first, then random ones; ``n`` None means one per shard, and at least 64."""
    rng = random.Random(seed)
    order = sorted(intact)
    total = n if n is not None else max(64, len(order))
    picks: dict[int, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
    for i in range(total if order else 0):
        s = order[i] if i < len(order) else rng.choice(order)
        v = rng.choice(list(cache.meta.block_views(rng.choice(intact[s]))))
        picks[s][v].add(rng.randrange(cache.meta.shards[s].count))
    return picks


def verify(cfg: VerifyConfig, min_top1: float = 0.99) -> dict[str, Any]:
    """Check every array and every finished unit's checksum, the keys, labels and image digests against the
    shards, the replayed pixels of every image, then re-run the teacher live on random replayed (sample,
    view) pairs and compare with the cache.

    Returns a report with ``ok`` False when an array or unit is damaged, a key, label or image differs, a
    unit is missing, replayed pixels differ, or the top-1 agreement or max |logit difference| is beyond
    tolerance. Library versions other than the cache's are a warning and listed in the report.
    """
    cfg = checked(cfg)
    cache = open_cache(cfg.cache)  # every array's metadata is checked against the attributes here
    meta = cache.meta
    versions = check_versions(meta)  # warns, as train-student does: the pixel check says whether it matters
    weights = recorded_weights(meta.teacher, cfg.teacher_checkpoint or None, f"cache {cfg.cache!r}")
    problems, damaged, verified = _integrity(cache)
    if not is_recorded(weights, meta.teacher):
        problems.append(f"{weights.describe()} is not the teacher this cache was built with (SHA-256 differs)")
    shards = load_shard_list(cfg.shards, {s.name: s.count for s in meta.shards}, label_key=cfg.label_key)
    found, unread = _check_samples(cache, shards, {s for _, s in damaged})
    problems += found
    agreement = _Replayer(cfg, cache, weights).run(shards, damaged, unread)
    report = _report(cfg, meta.topk, agreement, problems, min_top1)
    report["library_versions_differ"] = versions
    return {**report, "units_verified": verified - len(damaged), "units_damaged": len(damaged)}


class _Replayer:
    """Replays each shard once (decoded once) for the pixel checks and for the live teacher's picks."""

    def __init__(self, cfg: VerifyConfig, cache: Cache, weights: TeacherWeights):
        self.cfg, self.cache, self.meta = cfg, cache, cache.meta
        self.device = resolve_device(cfg.device)
        t = self.meta.teacher
        self.teacher, _ = load_teacher(t["name"], self.meta.num_classes, weights, self.device, t.get("kwargs"))
        self.recipe: Recipe = make_recipe(self.meta.recipe)
        self.how = reduction_of(self.meta)
        self.a = _Agreement()

    def run(self, shards: list[ShardInfo], damaged: set[tuple[int, int]], unread: set[tuple[int, int]]) -> _Agreement:
        """``unread``: samples already reported unreadable (not reported again as undecodable)."""
        intact = _intact_blocks(self.cache, shards, damaged)
        picks = _pick(self.cache, intact, self.cfg.samples, self.cfg.seed)
        by_name = {s.name: s for s in shards}
        for s in sorted(intact):
            if self.cfg.pixels != "all" and s not in picks:
                continue
            shard = by_name[self.meta.shards[s].name]
            held = list(iter_decoded(shard, s, self.meta.num_classes, on_error="skip"))
            decoded, labels = {x.position for x in held}, self.cache.labels(s)
            lost = [p for p in range(shard.count) if labels[p] >= 0 and p not in decoded and (s, p) not in unread]
            if lost:
                self.a.undecodable[shard.name] = lost
            if self.cfg.pixels == "all":
                self._every_image(shard, s, held, intact[s])
            for v, positions in sorted(picks.get(s, {}).items()):
                self._teacher(shard, s, v, held, positions)
        return self.a

    def _replay(self, shard: ShardInfo, v: int, held: list[DecodedSample], only: set[int]) -> list[View]:
        return list(mixed_views(held, v, self.recipe, self.meta.seed, shard.name, shard.count, only=only))

    def _every_image(self, shard: ShardInfo, s: int, held: list[DecodedSample], blocks: list[int]) -> None:
        """Each image in one view whose row holds its pixel digest (the rows rotate with the view: the images
        of one residue of ``n`` in one view each), replaying only those images and their mixing partners."""
        n, off = check_period(self.meta.views), check_offset(self.meta.seed, shard.name, self.meta.views)
        views = [v for b in blocks for v in self.meta.block_views(b)]
        for r in range(n):
            positions = {x.position for x in held if (x.position + off) % n == r}
            ours = [v for v in views if v % n == r]
            if not ours:  # no finished view of this residue (already reported: units not done)
                self.a.images_unchecked += len(positions)
                continue
            rows = self.cache.read_view(ours[0], s)
            for x in self._replay(shard, ours[0], held, positions):
                if x.position in positions:
                    self._check_digest(shard, ours[0], rows, x)

    def _teacher(self, shard: ShardInfo, s: int, v: int, held: list[DecodedSample], positions: set[int]) -> None:
        """The live teacher on the picked positions' replayed views, against the cache's rows: the kept
        classes and their values, and the KL between the teacher's full distribution and the one rebuilt
        from the cache at every cached temperature."""
        rows = self.cache.read_view(v, s)
        replayed = self._replay(shard, v, held, positions)
        if self.cfg.pixels != "all":
            for x in replayed:
                self._check_digest(shard, v, rows, x)
        chosen = [x for x in replayed if x.position in positions]
        if not chosen:
            return
        with torch.inference_mode(), autocast(self.device):
            logits = self.teacher(stack_views([x.pixels for x in chosen]).to(self.device)).float().cpu()
        live = {k: x.numpy() for k, x in teacher_outputs(logits, self.how, half=False).items()}
        pos = [x.position for x in chosen]
        self.a.shards.add(s)
        for j, p in enumerate(pos):
            self.a.add(
                {"values": rows.values[p], "indices": rows.indices[p].astype(np.int64)},
                {k: x[j] for k, x in live.items()},
            )
        _soft_target_kl(self.meta, logits, rows, pos, self.a)

    def _check_digest(self, shard: ShardInfo, v: int, rows: UnitData, x: View) -> None:
        """Recompute the digest of a replayed view whose row phase 1 recorded one."""
        expected = int(rows.pixel_digests[x.position, 0])
        if expected and checked_row(self.meta.seed, self.meta.views, v, shard.name, x.position):
            self.a.pixels_checked += 1
            ours = pixel_digest(x.pixels)
            if ours != expected:
                where = f"shard {shard.url!r} key {x.key!r} view {v}"
                self.a.pixel_mismatches.append(replay_mismatch(self.meta, where, ours, expected))


def _soft_target_kl(meta: CacheMeta, logits: torch.Tensor, rows: UnitData, pos: list[int], a: _Agreement) -> None:
    """KL(teacher's full distribution || the one rebuilt from the cache rows) at every cached temperature."""
    values = torch.from_numpy(rows.values[pos].astype(np.float32))
    indices = torch.from_numpy(rows.indices[pos].astype(np.int64))
    lse = torch.from_numpy(rows.logsumexp[pos])
    t0 = meta.temperatures[0]
    for i, tau in enumerate(meta.temperatures):
        full = torch.softmax(logits / tau, dim=-1)
        rebuilt = soft_target_probs(values, indices, lse[:, 0], lse[:, i], t0, tau, meta.num_classes)
        kl = torch.nn.functional.kl_div(rebuilt.clamp_min(1e-30).log(), full, reduction="none").sum(dim=-1)
        a.kl[tau] += kl.tolist()


def _report(cfg: VerifyConfig, k: int, a: _Agreement, problems: list[str], min_top1: float) -> dict[str, Any]:
    report: dict[str, Any] = {
        "cache": cfg.cache,
        "checked": a.checked,
        "shards_checked": len(a.shards),
        "top1_agreement": round(a.top1 / a.checked, 4) if a.checked else None,
        "topk_overlap": round(a.overlap / a.kept, 4) if a.kept else None,
        "max_abs_value_diff": round(a.max_diff, 5),
        "atol": cfg.atol,
        "soft_target_kl": {str(t): round(float(np.mean(v)), 6) for t, v in sorted(a.kl.items())},
        "pixels_checked": a.pixels_checked,
        "pixel_mismatches": len(a.pixel_mismatches),
        "images_pixels_unchecked": a.images_unchecked,
    }
    if a.checked and report["top1_agreement"] < min_top1:
        problems.append(f"top-1 agreement {report['top1_agreement']} < {min_top1}")
    if a.max_diff > cfg.atol:
        problems.append(f"max |value difference| {a.max_diff:.4g} > {cfg.atol}")
    for name, lost in a.undecodable.items():
        problems.append(
            f"shard {name!r}: {len(lost)} sample(s) read when the cache was made cannot be decoded here "
            f"(first at position {lost[0]}): another Pillow build, or changed bytes"
        )
    if a.pixel_mismatches:
        problems.append(
            f"{len(a.pixel_mismatches)} of {a.pixels_checked} replayed views differ: {a.pixel_mismatches[0]}"
        )
    if not a.checked and not problems:
        raise CacheError(f"cache {cfg.cache!r}: nothing to verify (no finished unit on these shards)")
    report["problems"] = problems
    report["ok"] = not problems
    return report
