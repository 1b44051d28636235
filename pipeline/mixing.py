"""Mixup / CutMix partners drawn from the whole shard, new for every view, the same in both phases.

For view ``v`` of a shard, a permutation seeded by ``(seed, v, shard)`` orders the shard's positions;
within each repeated-augmentation group of block ``v // R`` (:func:`pipeline.samplers.groups`; one
group when ``R = 1``), consecutive positions of that order are partners, and an odd one out stays
unmixed, as does the partner of a sample that is not there (skipped as bad). Both members of a pair
share one decision (mix or not, mixup or cutmix), one lambda and one box, drawn from a generator
seeded by ``(seed, v, shard, pair)``; each member's view is its own pixels mixed with its partner's,
so each gets its own teacher logits. Over ``V`` views a sample meets
partners from its whole shard. Pixels are mixed in float32 and rounded once, when the view is made
compact (:func:`pipeline.replay.compact`).
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Collection

import torch

from .recipe import Recipe
from .samplers import groups
from .seeding import shuffled, stable_seed


def partners(
    seed: int, view: int, shard: str, count: int, repeats: int, present: Collection[int]
) -> list[tuple[int, int | None]]:
    """The pairs of ``present`` positions mixed together in ``view``; ``(p, None)`` for one left alone.

    Pairs are fixed by ``(seed, view, shard, count, repeats)`` alone: consecutive positions of the
    view's permutation within one repeated-augmentation group, so the partner of a trained copy is
    trained in the same epoch. A position missing from ``present`` (a skipped bad sample, or one
    another epoch trains) leaves only its own partner unmixed.
    """
    group = groups(seed, view // repeats, shard, count, repeats)
    members: dict[int, list[int]] = defaultdict(list)
    for p in shuffled(count, "mix-order", seed, view, shard):
        members[group[p]].append(p)
    pairs: list[tuple[int, int | None]] = []
    for g in sorted(members):
        ms = members[g]
        slots: list[tuple[int, int | None]] = list(zip(ms[0::2], ms[1::2], strict=False))
        if len(ms) % 2:
            slots.append((ms[-1], None))
        for a, b in slots:
            here = [p for p in (a, b) if p is not None and p in present]
            if len(here) == 2:
                pairs.append((a, b))  # type: ignore[arg-type]
            elif here:
                pairs.append((here[0], None))
    return pairs


def cutmix_box(lam: float, size: int, rng: random.Random) -> tuple[int, int, int, int, float]:
    """timm's rand_bbox + area-corrected lambda for a square image of side ``size``."""
    ratio = math.sqrt(1 - lam)
    cut = int(size * ratio)
    cy, cx = rng.randrange(size), rng.randrange(size)
    y0, y1 = max(cy - cut // 2, 0), min(cy + cut // 2, size)
    x0, x1 = max(cx - cut // 2, 0), min(cx + cut // 2, size)
    lam = 1.0 - (y1 - y0) * (x1 - x0) / float(size * size)
    return y0, y1, x0, x1, lam


def mix_pair(
    a: torch.Tensor, b: torch.Tensor, recipe: Recipe, seed: int, view: int, shard: str, pair: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """Mix two views (uint8 or float32 CHW); ``None`` when this pair is left unmixed (``mixup_prob``).

    Returns:
        ``a`` mixed with ``b``, ``b`` mixed with ``a``, and their shared lambda (the weight of each
        member's own label). CutMix of two uint8 views stays uint8 (its pixels are still integers).
    """
    rng = random.Random(stable_seed("mix-pair", seed, view, shard, *pair))
    if recipe.mixup_prob < 1.0 and rng.random() >= recipe.mixup_prob:
        return None
    if recipe.cutmix > 0 and (recipe.mixup <= 0 or rng.random() < recipe.mixup_switch_prob):
        y0, y1, x0, x1, lam = cutmix_box(rng.betavariate(recipe.cutmix, recipe.cutmix), recipe.img_size, rng)
        if a.dtype != b.dtype:
            a, b = _float(a), _float(b)
        pa, pb = a.clone(), b.clone()
        pa[:, y0:y1, x0:x1] = b[:, y0:y1, x0:x1]
        pb[:, y0:y1, x0:x1] = a[:, y0:y1, x0:x1]
        return pa, pb, lam
    lam = rng.betavariate(recipe.mixup, recipe.mixup)
    fa, fb = _float(a), _float(b)
    return fa * lam + fb * (1 - lam), fb * lam + fa * (1 - lam), lam


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x
