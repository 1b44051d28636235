"""``stillroom cache-status``: what a cache holds, how complete and intact it is, what it serves, and how
far its soft targets are from the teacher's (the tail mass the kept classes miss, per temperature)."""

from __future__ import annotations

from typing import Any

from pipeline.cache import UnitDamaged, missing_objects, open_cache
from pipeline.models.targets import TailMass


def status(url: str) -> dict[str, Any]:
    """Completeness by view block and shard, damaged units, storage, teacher top-1 agreement with labels, and
    the tail mass per cached temperature.

    Every finished unit is read back and checked against its checksum (the statistics need its data
    anyway); a damaged one is listed with why, never a crash.
    """
    cache = open_cache(url)
    meta = cache.meta
    done = cache.done_mask()
    blocks, nshards = done.shape
    spans = [f"{meta.block_views(b).start}-{meta.block_views(b).stop - 1}" for b in range(blocks)]
    missing = [(b, s) for b in range(blocks) for s in range(nshards) if not done[b, s]]
    finished = [(b, s) for b in range(blocks) for s in range(nshards) if done[b, s]]
    why: dict[tuple[int, int], str] = {
        u: f"{', '.join(k)} missing" for u, k in missing_objects(cache, finished).items()
    }
    agree = sample_views = kept = 0
    tails = TailMass(meta)
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
        sample_views += int(valid.sum()) * unit.indices.shape[0]
        kept += int((unit.indices[:, valid] >= 0).sum())
        tails.add(unit, valid)
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
        "teacher_top1_vs_label_pct": round(100.0 * agree / sample_views, 2) if sample_views else None,
        "topk": meta.topk,
        "topk_mass": meta.topk_mass,
        "kept_per_view": round(kept / sample_views, 2) if sample_views else None,
        "temperatures": list(meta.temperatures),
        "tail_mass": tails.summary(),
        "teacher": meta.teacher["name"],
        "training": _training_note(meta.views, int(meta.recipe.get("repeats", 1))),
        "views_fingerprint": meta.views_fingerprint,
        "teacher_fingerprint": meta.teacher_fingerprint,
        "fingerprint": meta.fingerprint,
    }


def _training_note(views: int, repeats: int) -> dict[str, Any]:
    """How many epochs this cache serves: a run of E epochs uses E views of each sample, whatever R."""
    return {
        "views": views,
        "repeats": repeats,
        "epochs_before_views_repeat": views,
        "how": f"train-student --repeats {repeats} (or 1): an epoch trains 1/R of the samples R times, one view "
        f"each, so E epochs use E views of every sample ({views} epochs before views repeat; a multiple of R)",
    }
