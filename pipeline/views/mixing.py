"""Mixup / CutMix partners drawn from the whole shard, new for every epoch's RA block, the same in both phases.

For repeated-augmentation block ``b`` (views ``b*R .. b*R+R-1``, :mod:`pipeline.views.plans`), a
permutation seeded by ``(seed, b, shard)`` orders the shard's positions; within each RA group of
the block, consecutive positions of that order are partners, and an odd one out stays unmixed, as
does the partner of a sample that is not there (skipped as bad). A sample keeps its partner for the
``R`` views of the block (as DeiT's repeated copies often do) and meets a new one every block, so a
pair is self-contained for a whole epoch: the smallest unit whose pixels can be reproduced on their own,
which is what lets phase 2 deal pairs to ranks (:mod:`pipeline.views.deal`). Each view draws its own
decision (mix or not, mixup or cutmix), lambda and box from a generator seeded by
``(seed, view, shard, pair)``, shared by both members; each member's view is its own pixels mixed
with its partner's, so each gets its own teacher logits. With ``R = 1`` a block is a view. Pixels are
mixed in float32 and rounded once, when the view is made compact (:func:`pipeline.views.pixels.compact`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection

import torch

from pipeline.seeding import shuffled, stable_seed
from pipeline.views.plans import groups
from pipeline.views.recipe import Recipe


def group_sequence(seed: int, block: int, shard: str, count: int, repeats: int, group: int) -> list[int]:
    """The positions of one RA group of ``shard`` in block ``block``, in pair order: the two members of
    each pair side by side (indices ``2i`` and ``2i + 1``), an odd one out last."""
    member = groups(seed, block, shard, count, repeats)
    return [p for p in shuffled(count, "mix-order", seed, block, shard) if member[p] == group]


def partners(
    seed: int, block: int, shard: str, count: int, repeats: int, present: Collection[int]
) -> list[tuple[int, int | None]]:
    """The pairs of ``present`` positions mixed together in RA block ``block``; ``(p, None)`` for one
    left alone (an odd one out, or a sample whose partner is not in ``present``).

    Pairs are fixed by ``(seed, block, shard, count, repeats)`` alone (:func:`group_sequence` of every
    group), so the partner of a trained copy is trained in the same epoch with the same views.
    """
    pairs: list[tuple[int, int | None]] = []
    for g in range(repeats):
        seq = group_sequence(seed, block, shard, count, repeats, g)
        for i in range(0, len(seq), 2):
            here = [p for p in seq[i : i + 2] if p in present]
            if len(here) == 2:
                pairs.append((here[0], here[1]))
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
    return (*_mixup(a, b, lam), lam)


def _mixup(a: torch.Tensor, b: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``fa * lam + fb * (1 - lam)`` and ``fb * lam + fa * (1 - lam)`` in float32, every product and sum rounded
    as those expressions round them, in four images instead of eight: each member's ``(1 - lam)`` product is
    the other's second term, and the ``lam`` products are made in place."""
    fa, fb = _float_copy(a), _float_copy(b)
    ta, tb = fa * (1 - lam), fb * (1 - lam)
    return fa.mul_(lam).add_(tb), fb.mul_(lam).add_(ta)


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


def _float_copy(x: torch.Tensor) -> torch.Tensor:
    """:func:`_float` in a tensor of its own, which the caller may change in place."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.clone()
