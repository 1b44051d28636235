"""Teacher targets: what the cache stores for a batch of teacher logits, and the soft targets rebuilt
from it. Phase 1, the live mode and ``verify-cache`` all reduce logits here, so cached and live targets
go through one path, to the bit.

Per row, the cache keeps the classes of the ``K`` largest logits (``indices``, descending) and their
log-probabilities at the first cached temperature ``t0`` (``values = logits / t0 - lse_t0``, float16):
stored relative to the row's logsumexp, the float16 rounding lands on log-probabilities near 0 where
probabilities are large, instead of on logits of 10 to 30 (a 1% error floor on a confident teacher's
top probability). With a mass target ``m``, only the fewest classes whose probability at the largest
cached temperature reaches ``m`` are kept (at least ``k_min``, at most ``K``); unused columns hold value 0
and index -1. ``logsumexp(logits / tau)`` over all classes is kept for every cached temperature, so
``p_tau = exp(t0 * (value + lse_t0) / tau - lse_tau)`` is exact for the kept classes, and the mass they
miss (the tail) is known exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.cache import CacheMeta, UnitData
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class Reduction:
    """How a row of teacher logits is reduced: at most ``k`` logits (per-row K with ``mass``), ``T`` lse."""

    k: int
    temperatures: tuple[float, ...]
    mass: float | None = None
    k_min: int = 1


def reduction_of(meta: CacheMeta) -> Reduction:
    """How a cache reduced its teacher's logits (its K, mass target and temperatures)."""
    return Reduction(meta.topk, tuple(meta.temperatures), meta.topk_mass, meta.topk_min)


@torch.no_grad()
def target_temperature(distillation: str, tau: float, teachers: int) -> float | None:
    """The one cached temperature besides the first whose logsumexp a run's targets need: ``tau`` for soft
    distillation, 1 for the hard argmax of several teachers' combined distributions, None for one teacher's
    hard argmax (the stored indices alone). Phase 2 checks the caches hold it and reads only it."""
    if distillation == "soft":
        return float(tau)
    return 1.0 if distillation == "hard" and teachers > 1 else None


def teacher_outputs(logits: torch.Tensor, how: Reduction, half: bool = True) -> dict[str, torch.Tensor]:
    """What the cache stores for a batch of teacher logits (computed in float32).

    Returns:
        ``values`` ``[n, K]`` log-probabilities at the first temperature (float16 as stored unless
        ``half=False``; 0 in unused columns), ``indices`` ``[n, K]`` int64 (-1 in unused columns) and
        ``logsumexp`` ``[n, T]`` float32.
    """
    logits = logits.float()
    if how.k > logits.shape[-1]:
        raise ConfigError(f"--topk {how.k} is larger than the number of classes {logits.shape[-1]}")
    top, indices = torch.topk(logits, how.k, dim=-1, largest=True, sorted=True)
    lse = torch.stack([torch.logsumexp(logits / t, dim=-1) for t in how.temperatures], dim=-1)
    t0 = how.temperatures[0]
    values = top / t0 - lse[:, :1]
    if how.mass is not None:
        tau = max(how.temperatures)
        kept = torch.exp(top / tau - lse[:, how.temperatures.index(tau), None]).cumsum(dim=-1)
        # the fewest columns whose mass reaches the target: 1 + the columns still below it
        k_row = (1 + (kept < how.mass).sum(dim=-1)).clamp(how.k_min, how.k)
        unused = torch.arange(how.k, device=logits.device)[None, :] >= k_row[:, None]
        values = values.masked_fill(unused, 0.0)
        indices = indices.masked_fill(unused, -1)
    return {"values": values.half() if half else values, "indices": indices, "logsumexp": lse}


def topk_targets(
    logits: torch.Tensor, k: int, temperatures: list[float], half: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values, indices, logsumexp)`` of a fixed top-``k`` reduction (see :func:`teacher_outputs`)."""
    out = teacher_outputs(logits, Reduction(k, tuple(temperatures)), half=half)
    return out["values"], out["indices"], out["logsumexp"]


def kept_probs(
    values: torch.Tensor, indices: torch.Tensor, lse0: torch.Tensor, lse: torch.Tensor, t0: float, tau: float
) -> torch.Tensor:
    """``[n, K]`` the exact teacher probabilities of the kept classes at ``tau`` (0 in unused columns).

    Args:
        values: ``[n, K]`` log-probabilities at ``t0`` (the cache's first temperature).
        lse0, lse: ``[n]`` logsumexp of the logits divided by ``t0`` and by ``tau``.
    """
    v = values.float()
    logp = v if tau == t0 else (v + lse0.float()[:, None]) * (t0 / tau) - lse.float()[:, None]
    top = torch.exp(logp)
    return torch.where(indices >= 0, top, torch.zeros_like(top))


def tail_mass(
    values: torch.Tensor, indices: torch.Tensor, lse0: torch.Tensor, lse: torch.Tensor, t0: float, tau: float
) -> torch.Tensor:
    """``[n]`` the teacher's probability outside the kept classes at ``tau``, exact up to the float16
    rounding of the values (clamped at 0 against that rounding)."""
    return (1.0 - kept_probs(values, indices, lse0, lse, t0, tau).sum(dim=-1)).clamp_min(0.0)


TAIL_BINS = 1000  # tail mass histogram on [0, 1]: quantiles to 0.001


def unit_kept_probs(meta: CacheMeta, unit: UnitData, valid: np.ndarray) -> Iterator[tuple[float, np.ndarray]]:
    """Per cached temperature, :func:`kept_probs` of a unit's valid rows as ``[views, rows, K]`` (0 in unused
    columns; column 0 is the teacher's top-1): what ``cache-status`` and the report summarise."""
    values = torch.from_numpy(unit.values[:, valid].astype(np.float32))
    indices = torch.from_numpy(unit.indices[:, valid].astype(np.int64))
    lse = torch.from_numpy(unit.logsumexp[:, valid].astype(np.float32))
    shape, k = values.shape, values.shape[-1]
    flat = values.reshape(-1, k), indices.reshape(-1, k), lse.reshape(-1, lse.shape[-1])
    t0 = meta.temperatures[0]
    for i, tau in enumerate(meta.temperatures):
        probs = kept_probs(flat[0], flat[1], flat[2][:, 0], flat[2][:, i], t0, tau)
        yield tau, probs.reshape(shape).numpy()


class TailMass:
    """Histogram of the tail mass (:func:`tail_mass`, exact from values and logsumexp) per temperature."""

    def __init__(self, meta: CacheMeta):
        self.meta = meta
        self.counts = {t: np.zeros(TAIL_BINS, np.int64) for t in meta.temperatures}
        self.sums = dict.fromkeys(meta.temperatures, 0.0)

    def add(self, unit: UnitData, valid: np.ndarray) -> None:
        k = unit.values.shape[-1]
        values = torch.from_numpy(unit.values[:, valid].astype(np.float32)).reshape(-1, k)
        indices = torch.from_numpy(unit.indices[:, valid].astype(np.int64)).reshape(-1, k)
        lse = torch.from_numpy(unit.logsumexp[:, valid].astype(np.float32)).reshape(values.shape[0], -1)
        t0 = self.meta.temperatures[0]
        for i, tau in enumerate(self.meta.temperatures):
            tail = tail_mass(values, indices, lse[:, 0], lse[:, i], t0, tau).clamp(max=1.0).numpy()
            self.sums[tau] += float(tail.sum())
            bins = np.minimum((tail * TAIL_BINS).astype(int), TAIL_BINS - 1)
            self.counts[tau] += np.bincount(bins, minlength=TAIL_BINS)

    def summary(self) -> dict[str, Any]:
        """Mean, median and 95th percentile of the tail mass per temperature (``str(tau)`` keys)."""
        out = {}
        for tau, counts in self.counts.items():
            n = int(counts.sum())
            if not n:
                continue
            cdf = np.cumsum(counts) / n
            q = {p: float((np.searchsorted(cdf, p) + 0.5) / TAIL_BINS) for p in (0.5, 0.95)}
            out[str(tau)] = {"mean": round(self.sums[tau] / n, 4), "p50": round(q[0.5], 3), "p95": round(q[0.95], 3)}
        return out


def soft_target_probs(
    values: torch.Tensor,
    indices: torch.Tensor,
    lse0: torch.Tensor,
    lse: torch.Tensor,
    t0: float,
    tau: float,
    num_classes: int,
) -> torch.Tensor:
    """Dense teacher distribution at ``tau`` from the kept classes and the full logsumexp.

    The kept probabilities are exact (:func:`kept_probs`); the tail is spread uniformly over the classes
    not kept in that row (TinyViT's choice: nothing is known about how it is shared).
    """
    valid = indices >= 0
    top = kept_probs(values, indices, lse0, lse, t0, tau)
    # float16 rounding can make the kept mass exceed 1 by a few 1e-4: scale it back, so a target sums to 1
    top = top / top.sum(dim=1, keepdim=True).clamp_min(1.0)
    rest = (1.0 - top.sum(dim=1, keepdim=True)).clamp_min(0.0)
    others = (num_classes - valid.sum(dim=1, keepdim=True)).clamp_min(1)
    index = indices.long().clamp_min(0)
    # Each kept class appears once in its row and unused columns add exactly 0: the sums are exact.
    dense = torch.zeros(values.shape[0], num_classes, device=values.device).scatter_add_(1, index, top)
    covered = torch.zeros_like(dense).scatter_add_(1, index, valid.float()) > 0
    return torch.where(covered, dense, (rest / others).expand(-1, num_classes))


def pack_rows(outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[tuple[str, torch.dtype, int]]]:
    """Several per-row outputs as one ``[n, bytes]`` uint8 tensor (one device-to-host copy instead of
    one per output), with the layout :func:`unpack_rows` needs. Indices travel as int32."""
    parts, layout = [], []
    for name, t in outputs.items():
        t = t.to(torch.int32) if t.dtype == torch.int64 else t
        t = t.contiguous().reshape(t.shape[0], -1)
        parts.append(t.view(torch.uint8).reshape(t.shape[0], -1))
        layout.append((name, t.dtype, t.shape[1]))
    return torch.cat(parts, dim=1), layout


def unpack_rows(raw: np.ndarray, layout: list[tuple[str, torch.dtype, int]]) -> dict[str, np.ndarray]:
    """The outputs :func:`pack_rows` packed, as numpy arrays ``[n, width]`` (bytes reinterpreted, not converted)."""
    out, at = {}, 0
    for name, dtype, width in layout:
        np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        size = np_dtype.itemsize * width
        out[name] = np.ascontiguousarray(raw[:, at : at + size]).view(np_dtype)
        at += size
    return out
