"""Inspecting and verifying a cache: ``stillroom cache-status`` and ``stillroom verify-cache``."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

import numpy as np
import torch

from .cache import Cache, CacheError, open_cache
from .models import Normalized, autocast, file_sha256, load_model, resolve_device, topk_targets
from .recipe import make_recipe
from .replay import replay_shard
from .shards import ShardInfo, iter_decoded, iter_raw, load_shard_list


def status(url: str) -> dict[str, Any]:
    """Completeness by view block and shard, storage, and teacher top-1 agreement with labels."""
    cache = open_cache(url)
    meta = cache.meta
    done = cache.done_counts()
    blocks, nshards = done.shape
    missing = [
        {"views": f"{cache.block_views(b).start}-{cache.block_views(b).stop - 1}", "shard": cache.shards[s]["name"]}
        for b in range(blocks)
        for s in range(nshards)
        if done[b, s] < 0
    ]
    agree = total = 0
    cap = cache.capacity
    for b in range(blocks):
        for s in range(nshards):
            if done[b, s] < 0:
                continue
            views = cache.block_views(b)
            rows = slice(s * cap, (s + 1) * cap)
            labels = np.asarray(cache.group["labels"][rows])
            top1 = np.asarray(cache.group["indices"][views.start : views.stop, rows, 0])
            valid = labels >= 0
            agree += int((top1[:, valid] == labels[valid]).sum())
            total += int(valid.sum()) * len(views)
    stored = cache.nbytes_stored()
    sample_views = sum(int(done[b][done[b] >= 0].sum()) * len(cache.block_views(b)) for b in range(blocks))
    return {
        "cache": url,
        "units_done": int((done >= 0).sum()),
        "units_total": int(done.size),
        "by_view_block": {
            f"{cache.block_views(b).start}-{cache.block_views(b).stop - 1}": f"{int((done[b] >= 0).sum())}/{nshards}"
            for b in range(blocks)
        },
        "missing_units": missing,
        "samples_views_cached": sample_views,
        "bytes_on_disk": stored,
        "bytes_per_sample_view": round(stored / sample_views, 2) if sample_views else None,
        "teacher_top1_vs_label_pct": round(100.0 * agree / total, 2) if total else None,
        "topk": meta["topk"],
        "temperatures": meta["temperatures"],
        "teacher": meta["teacher"]["name"],
        "fingerprint": meta["fingerprint"],
    }


def _check_keys(cache: Cache, shards: list[ShardInfo]) -> list[str]:
    """Compare every stored key with the shards' keys (tar headers only, no decode)."""
    problems = []
    cap = cache.capacity
    for shard in shards:
        s = cache.shard_index(shard.name)
        if not (cache.done_counts()[:, s] >= 0).any():
            continue
        stored = np.asarray(cache.group["keys"][s * cap : (s + 1) * cap])
        for raw in iter_raw(shard, s, on_error="skip"):
            if stored[raw.position] != raw.key:
                problems.append(
                    f"shard {shard.name!r} position {raw.position}: cache key {stored[raw.position]!r}, "
                    f"shard key {raw.key!r}"
                )
                break
    return problems


def verify(
    url: str,
    shards_spec: str,
    teacher_checkpoint: str,
    samples: int = 64,
    seed: int = 0,
    device: str = "cpu",
    atol: float = 0.05,
    min_top1: float = 0.99,
) -> dict[str, Any]:
    """Re-run the teacher live on random replayed (sample, view) pairs and compare with the cache.

    Returns a report with ``ok`` False when a key, the completeness, the top-1 agreement or the max
    |logit difference| is beyond tolerance.
    """
    cache = open_cache(url)
    meta = cache.meta
    problems: list[str] = []
    digest = file_sha256(teacher_checkpoint)
    if digest != meta["teacher"]["checkpoint_sha256"]:
        problems.append(f"teacher checkpoint {teacher_checkpoint!r} is not the one this cache was built with")
    counts = {s["name"]: s["count"] for s in cache.shards}
    shards = load_shard_list(shards_spec, counts)
    problems += _check_keys(cache, shards)
    done = cache.done_counts()
    if (done < 0).any():
        problems.append(f"{int((done < 0).sum())} of {done.size} units are not done")
    recipe = make_recipe(meta["recipe"])
    t = meta["teacher"]
    dev = resolve_device(device)
    teacher = load_model(t["name"], int(meta["num_classes"]), teacher_checkpoint, **t.get("kwargs", {}))
    teacher = Normalized(teacher, tuple(t["mean"]), tuple(t["std"])).eval().to(dev)
    rng = random.Random(seed)
    by_name = {s.name: s for s in shards}
    candidates = [
        (b, s)
        for b in range(done.shape[0])
        for s in range(done.shape[1])
        if done[b, s] > 0 and cache.shards[s]["name"] in by_name
    ]
    picks: dict[tuple[int, int], set[int]] = defaultdict(set)
    for _ in range(samples if candidates else 0):
        b, s = rng.choice(candidates)
        v = rng.choice(list(cache.block_views(b)))
        picks[(s, v)].add(rng.randrange(int(cache.shards[s]["count"])))
    top1_agree = checked = topk_overlap = 0
    max_diff = 0.0
    k, temps = int(meta["topk"]), list(meta["temperatures"])
    for (s, v), positions in sorted(picks.items()):
        shard = by_name[cache.shards[s]["name"]]
        rows = cache.read_view(v, s)
        samples_iter = iter_decoded(shard, s, int(meta["num_classes"]), on_error="skip")
        for window in replay_shard(samples_iter, [v], recipe, int(meta["seed"]), shard.name):
            chosen = [x for x in window if x.position in positions]
            if not chosen:
                continue
            with torch.inference_mode(), autocast(dev):
                logits = teacher(torch.stack([x.pixels for x in chosen]).to(dev))
            values, indices, _ = topk_targets(logits, k, temps, half=False)
            for j, x in enumerate(chosen):
                c_idx = rows["indices"][x.position].astype(np.int64)
                c_val = rows["values"][x.position].astype(np.float32)
                live_idx = indices[j].cpu().numpy()
                checked += 1
                top1_agree += int(c_idx[0] == live_idx[0])
                topk_overlap += len(set(c_idx.tolist()) & set(live_idx.tolist()))
                max_diff = max(max_diff, float(np.abs(c_val - values[j].cpu().numpy()).max()))
    report = {
        "cache": url,
        "checked": checked,
        "top1_agreement": round(top1_agree / checked, 4) if checked else None,
        "topk_overlap": round(topk_overlap / (checked * k), 4) if checked else None,
        "max_abs_logit_diff": round(max_diff, 5),
        "atol": atol,
    }
    if checked and report["top1_agreement"] < min_top1:
        problems.append(f"top-1 agreement {report['top1_agreement']} < {min_top1}")
    if max_diff > atol:
        problems.append(f"max |logit difference| {max_diff:.4g} > {atol}")
    if not checked and not problems:
        raise CacheError(f"cache {url!r}: nothing to verify (no finished unit on these shards)")
    report["problems"] = problems
    report["ok"] = not problems
    return report
