"""View replay: decoded samples + (seed, view) + recipe -> the exact augmented, mixed pixels.

Both phases call this module, so the teacher's cached logits and the student's inputs come from one
code path: the per-sample transform of :mod:`pipeline.views.augment`, then mixup/cutmix with the partner
:mod:`pipeline.views.mixing` names, then :func:`pipeline.views.pixels.compact`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from pipeline.shards.decode import DecodedSample
from pipeline.views.augment import augment
from pipeline.views.mixing import mix_pair, partners
from pipeline.views.pixels import compact
from pipeline.views.recipe import Recipe


@dataclass
class View:
    """One augmented view of one sample, with its ground-truth mix.

    ``pixels``: compact CHW (uint8 or float16, see :func:`compact`). ``label``/``mix_label``/``lam``:
    the ground-truth target is ``lam * onehot(label) + (1 - lam) * onehot(mix_label)`` (before label
    smoothing). Unmixed views have ``lam == 1``.
    """

    key: str
    shard_index: int
    position: int
    view_id: int
    pixels: torch.Tensor
    label: int
    mix_label: int
    lam: float
    digest: int = 0


def _view(s: DecodedSample, view: int, pixels: torch.Tensor, mix_label: int, lam: float) -> View:
    return View(s.key, s.shard_index, s.position, view, compact(pixels), s.label, mix_label, lam, s.digest)


def _pair_views(
    a: DecodedSample, b: DecodedSample | None, view: int, recipe: Recipe, seed: int, shard: str
) -> tuple[View, View | None]:
    """``view`` of ``a`` and of its partner ``b`` (in the pair's own order), mixed, or ``a`` alone."""
    xa = augment(a.image, recipe, seed, view, a.key).erased(recipe)
    if b is None:
        return _view(a, view, xa, a.label, 1.0), None
    xb = augment(b.image, recipe, seed, view, b.key).erased(recipe)
    mixed = mix_pair(xa, xb, recipe, seed, view, shard, (a.position, b.position))
    if mixed is None:
        return _view(a, view, xa, a.label, 1.0), _view(b, view, xb, b.label, 1.0)
    ma, mb, lam = mixed
    return _view(a, view, ma, b.label, lam), _view(b, view, mb, a.label, lam)


def mixed_views(
    samples: Sequence[DecodedSample],
    view: int,
    recipe: Recipe,
    seed: int,
    shard: str,
    count: int,
    only: Collection[int] | None = None,
) -> Iterator[View]:
    """The finished ``view`` of each of ``samples`` (a whole shard, or the part an epoch trains), mixed with
    its partner among them (:func:`pipeline.views.mixing.partners`). Views come out pair by pair; with
    ``only``, just the pairs with a member at one of those positions are made (partners are still drawn
    among all of ``samples``, so each view is the one the whole shard gives)."""
    by_position = {s.position: s for s in samples}
    pairs = (
        partners(seed, view // recipe.repeats, shard, count, recipe.repeats, by_position)
        if recipe.mixes
        else [(p, None) for p in by_position]
    )
    if only is not None:
        pairs = [(pa, pb) for pa, pb in pairs if pa in only or pb in only]
    for pa, pb in pairs:
        va, vb = _pair_views(by_position[pa], None if pb is None else by_position[pb], view, recipe, seed, shard)
        yield va
        if vb is not None:
            yield vb


def pair_copies(
    a: DecodedSample, b: DecodedSample | None, views: Sequence[int], recipe: Recipe, seed: int, shard: str
) -> tuple[list[View], list[View]]:
    """Phase 2: the copies of a pair (``a`` before ``b``, as :func:`pipeline.views.mixing.group_sequence` orders
    them), one per view of the epoch, or of ``a`` alone when ``b`` is None."""
    copies_a: list[View] = []
    copies_b: list[View] = []
    for v in views:
        va, vb = _pair_views(a, b if recipe.mixes else None, v, recipe, seed, shard)
        copies_a.append(va)
        if vb is not None:
            copies_b.append(vb)
    return copies_a, copies_b


def replay_shard(
    samples: Iterable[DecodedSample], views: Sequence[int], recipe: Recipe, seed: int, shard: str, count: int
) -> Iterator[View]:
    """Every finished view in ``views`` of every sample of a shard (phase 1's unit, ``verify-cache``).

    Each image is decoded once (by the caller) and reused for every view: with mixing the whole shard
    is held decoded (partners come from all of it); without, samples stream through one at a time.
    """
    if not recipe.mixes:
        for s in samples:
            for v in views:
                yield from mixed_views([s], v, recipe, seed, shard, count)
        return
    held = list(samples)
    for v in views:
        yield from mixed_views(held, v, recipe, seed, shard, count)


def replay_copies(
    samples: Iterable[DecodedSample], views: Sequence[int], recipe: Recipe, seed: int, shard: str, count: int
) -> Iterator[list[View]]:
    """Phase 2: the copies of each sample an epoch trains, one per view of ``views``, sample by sample.

    ``samples`` are the epoch's repeated-augmentation group of the shard (the whole shard without
    repeats), so every partner is among them.
    """
    if not recipe.mixes:  # no partners: one sample at a time
        for s in samples:
            yield [x for v in views for x in mixed_views([s], v, recipe, seed, shard, count)]
        return
    held = list(samples)
    if len(views) == 1:  # one copy each: no need to hold finished views
        for x in mixed_views(held, views[0], recipe, seed, shard, count):
            yield [x]
        return
    copies: dict[int, list[View]] = defaultdict(list)
    for v in views:
        for x in mixed_views(held, v, recipe, seed, shard, count):
            copies[x.position].append(x)
    for s in held:
        yield copies[s.position]
