"""``stillroom cache-status``: what a cache holds, how complete and intact it is, what it serves, and how
far its soft targets are from the teacher's (the tail mass the kept classes miss, per temperature)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from .cache import CacheMeta, UnitDamaged, UnitData, missing_objects, open_cache

TAIL_BINS = 1000  # tail mass histogram on [0, 1]: quantiles to 0.001


def kept_probs(meta: CacheMeta, unit: UnitData, valid: np.ndarray) -> Iterator[tuple[float, np.ndarray]]:
    """Per cached temperature, the teacher's probabilities of the kept classes, ``[views, rows, K]``, 0 in
    unused columns; column 0 is the teacher's top-1.

    Exact, not approximate: the values are log-probabilities at the first temperature ``t0``, so
    ``(values + lse_t0) * t0`` are the logits, and ``lse_tau`` normalises them at ``tau``.
    """
    values = unit.values[:, valid].astype(np.float32)
    kept = unit.indices[:, valid] >= 0
    lse = unit.logsumexp[:, valid]
    t0 = meta.temperatures[0]
    for i, tau in enumerate(meta.temperatures):
        logp = values if i == 0 else (values + lse[..., :1]) * (t0 / tau) - lse[..., i : i + 1]
        yield tau, np.where(kept, np.exp(np.minimum(logp, 0.0)), 0.0)  # fp16 rounding can put a log-prob a hair above 0


class TailMass:
    """Histogram of the tail mass (1 - the kept probability, exact from values and logsumexp) per temperature."""

    def __init__(self, meta: CacheMeta):
        self.meta = meta
        self.counts = {t: np.zeros(TAIL_BINS, np.int64) for t in meta.temperatures}
        self.sums = dict.fromkeys(meta.temperatures, 0.0)

    def add(self, unit: UnitData, valid: np.ndarray) -> None:
        for tau, probs in kept_probs(self.meta, unit, valid):
            tail = np.clip(1.0 - probs.sum(axis=-1), 0.0, 1.0).ravel()
            self.sums[tau] += float(tail.sum())
            self.counts[tau] += np.bincount(
                np.minimum((tail * TAIL_BINS).astype(int), TAIL_BINS - 1), minlength=TAIL_BINS
            )

    def summary(self) -> dict[str, Any]:
        out = {}
        for tau, counts in self.counts.items():
            n = int(counts.sum())
            if not n:
                continue
            cdf = np.cumsum(counts) / n
            q = {p: float((np.searchsorted(cdf, p) + 0.5) / TAIL_BINS) for p in (0.5, 0.95)}
            out[str(tau)] = {"mean": round(self.sums[tau] / n, 4), "p50": round(q[0.5], 3), "p95": round(q[0.95], 3)}
        return out


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
