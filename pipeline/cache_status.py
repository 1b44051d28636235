"""``stillroom cache-status``: what a cache holds, how complete and intact it is, and what it serves."""

from __future__ import annotations

from typing import Any

from .cache import UnitDamaged, missing_objects, open_cache


def status(url: str) -> dict[str, Any]:
    """Completeness by view block and shard, damaged units, storage, and teacher top-1 agreement with labels.

    Every finished unit is read back and checked against its checksum (the agreement needs its data
    anyway); a damaged one is listed with why, never a crash.
    """
    cache = open_cache(url)
    meta = cache.meta
    done = cache.done_mask()
    blocks, nshards = done.shape
    spans = [f"{meta.block_views(b).start}-{meta.block_views(b).stop - 1}" for b in range(blocks)]
    missing = [(b, s) for b in range(blocks) for s in range(nshards) if not done[b, s]]
    finished = [(b, s) for b in range(blocks) for s in range(nshards) if done[b, s]]
    damaged = missing_objects(cache, finished)
    agree = total = sample_views = 0
    why: dict[tuple[int, int], str] = {u: f"{', '.join(keys)} missing" for u, keys in damaged.items()}
    for b, s in finished:
        if (b, s) in why:
            continue
        try:
            unit = cache.read_block(b, s)
        except UnitDamaged as e:
            why[(b, s)] = e.why
            continue
        valid = unit.labels >= 0
        agree += int((unit.indices[:, valid, 0] == unit.labels[valid]).sum())
        total += int(valid.sum()) * unit.indices.shape[0]
        sample_views += int(valid.sum()) * unit.indices.shape[0]
    intact = [(b, s) for b, s in finished if (b, s) not in why]
    stored = cache.nbytes_stored()
    return {
        "cache": url,
        "units_done": len(intact),
        "units_damaged": len(why),
        "units_total": int(done.size),
        "by_view_block": {spans[b]: f"{sum(1 for x, _ in intact if x == b)}/{nshards}" for b in range(blocks)},
        "missing_units": [{"views": spans[b], "shard": meta.shards[s].name} for b, s in missing],
        "damaged_units": [
            {"views": spans[b], "shard": meta.shards[s].name, "why": w} for (b, s), w in sorted(why.items())
        ],
        "samples_views_cached": sample_views,
        "bytes_on_disk": stored,
        "bytes_per_sample_view": round(stored / sample_views, 2) if sample_views else None,
        "teacher_top1_vs_label_pct": round(100.0 * agree / total, 2) if total else None,
        "topk": meta.topk,
        "temperatures": list(meta.temperatures),
        "teacher": meta.teacher["name"],
        "training": _training_note(meta.views, int(meta.recipe.get("repeats", 1))),
        "fingerprint": meta.fingerprint,
    }


def _training_note(views: int, repeats: int) -> dict[str, Any]:
    """How many epochs this cache serves: a run of E epochs uses E views of each sample, whatever R."""
    return {
        "views": views,
        "repeats": repeats,
        "epochs_before_views_repeat": views,
        "how": f"train-student --repeats {repeats} (or 1): an epoch trains 1/R of the samples R times, one view "
        f"each, so E epochs use E views of every sample; views repeat after {views} epochs",
    }
