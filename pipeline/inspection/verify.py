"""``stillroom verify-cache``: prove a cache right for its shards and teacher: every unit's checksum,
every key and image digest, then the live teacher on random replayed views."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.cache import Cache, CacheMeta, UnitData, damaged_units, open_cache, replay_mismatch
from pipeline.config import checked
from pipeline.errors import CacheError
from pipeline.models.build import autocast, resolve_device
from pipeline.models.targets import reduction_of, soft_target_probs, teacher_outputs
from pipeline.models.teacher import TeacherWeights, is_recorded, load_teacher, recorded_weights
from pipeline.options import VerifyConfig
from pipeline.shards.decode import iter_decoded
from pipeline.shards.lists import ShardInfo, load_shard_list
from pipeline.shards.samples import iter_raw
from pipeline.views.pixels import checked_row, pixel_digest, stack_views
from pipeline.views.recipe import make_recipe
from pipeline.views.replay import replay_shard


def _check_keys(cache: Cache, shards: list[ShardInfo], skip: set[int]) -> list[str]:
    """Compare every stored key and image digest with the shards' (their bytes are read, not decoded).

    Shards in ``skip`` (with a damaged unit, already reported) are left out: their keys may be the damage.
    """
    problems = []
    done = cache.done_mask()
    for shard in shards:
        s = cache.shard_index(shard.name)
        if s in skip or not done[:, s].any():
            continue
        keys, digests = cache.keys(s), cache.digests(s)
        for raw in iter_raw(shard, s, on_error="skip"):
            p = raw.position
            if keys[p] != raw.key:
                problems.append(f"shard {shard.name!r} position {p}: cache key {keys[p]!r}, shard key {raw.key!r}")
                break
            if digests[p] and int(digests[p]) != raw.digest:
                problems.append(f"shard {shard.name!r} key {raw.key!r}: image bytes differ from the cached sample's")
                break
    return problems


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

    def add(self, cached: dict[str, np.ndarray], live: dict[str, np.ndarray]) -> None:
        valid = cached["indices"] >= 0
        self.checked += 1
        self.top1 += int(cached["indices"][0] == live["indices"][0])
        self.overlap += len(set(cached["indices"][valid].tolist()) & set(live["indices"][valid].tolist()))
        self.kept += int(valid.sum())
        diff = np.abs(cached["values"][valid].astype(np.float32) - live["values"][valid])
        self.max_diff = max(self.max_diff, float(diff.max()))


def _pick(
    cache: Cache, shards: list[ShardInfo], n: int, seed: int, damaged: set[tuple[int, int]]
) -> dict[tuple[int, int], set[int]]:
    """``n`` random (shard, view, position) triples among intact finished units, grouped by (shard, view)."""
    rng = random.Random(seed)
    done = cache.done_mask()
    names = {s.name for s in shards}
    candidates = [
        (b, s)
        for b in range(done.shape[0])
        for s in range(done.shape[1])
        if done[b, s] and cache.meta.shards[s].name in names and (b, s) not in damaged
    ]
    picks: dict[tuple[int, int], set[int]] = defaultdict(set)
    for _ in range(n if candidates else 0):
        b, s = rng.choice(candidates)
        v = rng.choice(list(cache.meta.block_views(b)))
        picks[(s, v)].add(rng.randrange(cache.meta.shards[s].count))
    return picks


def verify(cfg: VerifyConfig, min_top1: float = 0.99) -> dict[str, Any]:
    """Check every array and every finished unit's checksum, the keys against the shards, then re-run the
    teacher live on random replayed (sample, view) pairs and compare with the cache.

    Returns a report with ``ok`` False when an array or unit is damaged, a key differs, a unit is
    missing, or the top-1 agreement or max |logit difference| is beyond tolerance.
    """
    cfg = checked(cfg)
    cache = open_cache(cfg.cache)  # every array's metadata is checked against the attributes here
    meta = cache.meta
    weights = recorded_weights(meta.teacher, cfg.teacher_checkpoint or None, f"cache {cfg.cache!r}")
    problems, damaged, verified = _integrity(cache)
    if not is_recorded(weights, meta.teacher):
        problems.append(f"{weights.describe()} is not the teacher this cache was built with (SHA-256 differs)")
    shards = load_shard_list(cfg.shards, {s.name: s.count for s in meta.shards}, label_key=cfg.label_key)
    problems += _check_keys(cache, shards, {s for _, s in damaged})
    agreement = _live_check(cfg, cache, shards, damaged, weights)
    report = _report(cfg, meta.topk, agreement, problems, min_top1)
    return {**report, "units_verified": verified - len(damaged), "units_damaged": len(damaged)}


def _live_check(
    cfg: VerifyConfig, cache: Cache, shards: list[ShardInfo], damaged: set, weights: TeacherWeights
) -> _Agreement:
    """Replay random (sample, view) pairs of intact units and compare the live teacher with the cache: the
    kept classes and their values, the KL between the teacher's full distribution and the one rebuilt
    from the cache at every cached temperature, and the digests of every checked row's replayed pixels."""
    meta = cache.meta
    device = resolve_device(cfg.device)
    t = meta.teacher
    teacher, _ = load_teacher(t["name"], meta.num_classes, weights, device, t.get("kwargs"))
    recipe, how = make_recipe(meta.recipe), reduction_of(meta)
    by_name = {s.name: s for s in shards}
    agreement = _Agreement()
    for (s, v), positions in sorted(_pick(cache, shards, cfg.samples, cfg.seed, damaged).items()):
        shard = by_name[meta.shards[s].name]
        rows = cache.read_view(v, s)
        samples = iter_decoded(shard, s, meta.num_classes, on_error="skip")
        replayed = list(replay_shard(samples, [v], recipe, meta.seed, shard.name, shard.count))
        _check_pixels(cache, shard, v, rows, replayed, agreement)
        chosen = [x for x in replayed if x.position in positions]
        if not chosen:
            continue
        with torch.inference_mode(), autocast(device):
            logits = teacher(stack_views([x.pixels for x in chosen]).to(device)).float().cpu()
        live = {k: x.numpy() for k, x in teacher_outputs(logits, how, half=False).items()}
        pos = [x.position for x in chosen]
        for j, p in enumerate(pos):
            agreement.add(
                {"values": rows.values[p], "indices": rows.indices[p].astype(np.int64)},
                {k: x[j] for k, x in live.items()},
            )
        _soft_target_kl(meta, logits, rows, pos, agreement)
    return agreement


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


def _check_pixels(cache: Cache, shard: ShardInfo, v: int, rows: UnitData, replayed: list, a: _Agreement) -> None:
    """Recompute the digest of every replayed view whose row phase 1 recorded one."""
    for x in replayed:
        expected = int(rows.pixel_digests[x.position, 0])
        if expected and checked_row(cache.meta.seed, v, shard.name, x.position):
            a.pixels_checked += 1
            ours = pixel_digest(x.pixels)
            if ours != expected:
                where = f"shard {shard.url!r} key {x.key!r} view {v}"
                a.pixel_mismatches.append(replay_mismatch(cache.meta, where, ours, expected))


def _report(cfg: VerifyConfig, k: int, a: _Agreement, problems: list[str], min_top1: float) -> dict[str, Any]:
    report: dict[str, Any] = {
        "cache": cfg.cache,
        "checked": a.checked,
        "top1_agreement": round(a.top1 / a.checked, 4) if a.checked else None,
        "topk_overlap": round(a.overlap / a.kept, 4) if a.kept else None,
        "max_abs_value_diff": round(a.max_diff, 5),
        "atol": cfg.atol,
        "soft_target_kl": {str(t): round(float(np.mean(v)), 6) for t, v in sorted(a.kl.items())},
        "pixels_checked": a.pixels_checked,
        "pixel_mismatches": len(a.pixel_mismatches),
    }
    if a.checked and report["top1_agreement"] < min_top1:
        problems.append(f"top-1 agreement {report['top1_agreement']} < {min_top1}")
    if a.max_diff > cfg.atol:
        problems.append(f"max |value difference| {a.max_diff:.4g} > {cfg.atol}")
    if a.pixel_mismatches:
        problems.append(
            f"{len(a.pixel_mismatches)} of {a.pixels_checked} replayed views differ: {a.pixel_mismatches[0]}"
        )
    if not a.checked and not problems:
        raise CacheError(f"cache {cfg.cache!r}: nothing to verify (no finished unit on these shards)")
    report["problems"] = problems
    report["ok"] = not problems
    return report
