"""Comparing the teachers of caches made over the same views (``cache-status`` with several caches).

Caches with equal views identity hold targets for the same pixels, row for row, so their teachers can be
compared view by view: how often their top-1 classes agree, and how far apart their soft targets are
(the KL between the distributions rebuilt from each cache, at every temperature both cached).
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import numpy as np
import torch

from pipeline.cache import Cache, UnitDamaged, diff_fields, open_cache
from pipeline.errors import CacheError
from pipeline.models.targets import soft_target_probs

COMPARE_UNITS = 32  # units compared (a seeded choice among those done in every cache): enough for 3 digits


def _dense(cache: Cache, unit: Any, valid: np.ndarray, tau: float) -> torch.Tensor:
    """``[views * rows, C]`` the soft targets of the valid rows of a unit, rebuilt at ``tau``."""
    temps = list(cache.meta.temperatures)
    values = torch.from_numpy(unit.values[:, valid].reshape(-1, unit.values.shape[-1]).astype(np.float32))
    indices = torch.from_numpy(unit.indices[:, valid].reshape(-1, unit.indices.shape[-1]).astype(np.int64))
    lse = torch.from_numpy(unit.logsumexp[:, valid].reshape(-1, len(temps)))
    i = temps.index(tau)
    return soft_target_probs(values, indices, lse[:, 0], lse[:, i], temps[0], tau, cache.meta.num_classes)


def compare(urls: list[str], seed: int = 0) -> dict[str, Any]:
    """Pairwise top-1 agreement and mean KL(a || b) of the teachers of ``urls`` over shared views."""
    caches = [open_cache(u) for u in urls]
    first = caches[0]
    for other in caches[1:]:
        if other.meta.views_fingerprint != first.meta.views_fingerprint:
            diffs = diff_fields(first.meta.views_identity(), other.meta.views_identity())
            raise CacheError(f"cache {other.url!r} was not made over the views of {first.url!r}: {'; '.join(diffs)}")
    done = np.logical_and.reduce([c.done_mask() for c in caches])
    units = [(int(b), int(s)) for b, s in np.argwhere(done)]
    units = sorted(random.Random(seed).sample(units, min(COMPARE_UNITS, len(units))))
    pairs = []
    for a, b in itertools.combinations(caches, 2):
        taus = [t for t in a.meta.temperatures if t in b.meta.temperatures]
        agree = rows = 0
        kl: dict[float, list[float]] = {t: [] for t in taus}
        for unit in units:
            try:
                ua, ub = a.read_block(*unit), b.read_block(*unit)
            except UnitDamaged:
                continue
            valid = ua.labels >= 0
            agree += int((ua.indices[:, valid, 0] == ub.indices[:, valid, 0]).sum())
            rows += int(valid.sum()) * ua.indices.shape[0]
            for tau in taus:
                p, q = _dense(a, ua, valid, tau), _dense(b, ub, valid, tau)
                kl[tau] += torch.nn.functional.kl_div(q.clamp_min(1e-30).log(), p, reduction="none").sum(-1).tolist()
        pairs.append(
            {
                "caches": [a.url, b.url],
                "teachers": [a.meta.teacher["name"], b.meta.teacher["name"]],
                "views_compared": rows,
                "top1_agreement": round(agree / rows, 4) if rows else None,
                "mean_kl": {str(t): round(float(np.mean(v)), 5) for t, v in kl.items() if v},
            }
        )
    return {"units_compared": len(units), "pairs": pairs}
