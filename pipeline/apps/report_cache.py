"""``stillroom report --cache URL``: a cache drawn from what is stored, while phase 1 runs or after.

* ``cache-units.png``: which units (view block x shard) are done, from one listing of the markers (the
  cheap view, for watching a cluster fill a cache);
* ``cache-targets.png``: the teacher's top-1 probability and the tail mass the kept top-k classes miss,
  per cached temperature, from a sample of finished units read and checked like any other read
  (the tail mass through :class:`pipeline.models.targets.TailMass`, as ``cache-status`` computes it);
* ``cache-bytes.png``: stored bytes per (sample, view), array by array.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.ticker import MaxNLocator

from pipeline import storage
from pipeline.apps.pictures import COLORS, new_figure, placeholder, save
from pipeline.cache import ARRAYS, Cache, CacheMeta, UnitDamaged, open_cache
from pipeline.models.targets import TAIL_BINS, TailMass, unit_kept_probs

BINS = 50  # histogram bins on [0, 1]; TAIL_BINS is a multiple


def _spans(meta: CacheMeta) -> list[str]:
    return [f"{meta.block_views(b).start}-{meta.block_views(b).stop - 1}" for b in range(meta.num_blocks)]


def units_picture(cache: Cache, done: np.ndarray, path: str) -> str:
    """Heat map of finished units: view blocks down, shards across."""
    blocks, shards = done.shape
    fig, ax = new_figure(9, max(2.5, min(6.5, 1.5 + 0.3 * blocks)))
    ax.imshow(done.astype(int), cmap=ListedColormap(["#e6e6e6", COLORS[2]]), vmin=0, vmax=1, aspect="auto")
    ax.set(xlabel=f"shard (0-{shards - 1})", ylabel="views (view block)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    step = max(1, blocks // 12)
    ax.set_yticks(range(0, blocks, step), _spans(cache.meta)[::step])
    per_block = done.sum(axis=1)
    ax.set_title(
        f"{cache.url}: {int(done.sum())} of {done.size} units done "
        f"(green); view blocks complete: {int((per_block == shards).sum())} of {blocks}",
        fontsize=10,
    )
    return save(fig, path)


def _sample(done: np.ndarray, units: int) -> list[tuple[int, int]]:
    """Up to ``units`` finished units spread evenly over the cache (0: all of them)."""
    finished = [(int(b), int(s)) for b, s in zip(*np.nonzero(done), strict=True)]
    if not units or len(finished) <= units:
        return finished
    return [finished[i] for i in np.linspace(0, len(finished) - 1, units).round().astype(int)]


def _target_histograms(cache: Cache, chosen: list[tuple[int, int]]) -> tuple[dict, TailMass, int, int]:
    """Counts of the top-1 probability per temperature, the tail mass, (sample, view)s read, damaged units."""
    meta = cache.meta
    top1 = {t: np.zeros(BINS, np.int64) for t in meta.temperatures}
    tails, seen, damaged = TailMass(meta), 0, 0
    for b, s in chosen:
        try:
            unit = cache.read_block(b, s)
        except UnitDamaged:
            damaged += 1  # cache-status names it and why; a picture only counts it
            continue
        valid = unit.labels >= 0
        tails.add(unit, valid)
        for tau, probs in unit_kept_probs(meta, unit, valid):
            top1[tau] += np.histogram(probs[..., 0].ravel(), bins=BINS, range=(0.0, 1.0))[0]
        seen += int(valid.sum()) * unit.indices.shape[0]
    return top1, tails, seen, damaged


def targets_picture(cache: Cache, done: np.ndarray, units: int, path: str) -> str:
    """Histograms of the teacher's top-1 probability and of the tail mass, one line per temperature."""
    chosen = _sample(done, units)
    top1, tails, seen, damaged = _target_histograms(cache, chosen)
    fig, axes = new_figure(9, 3.6, 1, 2)
    if not seen:
        for ax in axes:
            placeholder(ax, "no finished unit yet")
        return save(fig, path)
    edges = np.linspace(0.0, 1.0, BINS + 1)
    tail_counts = {t: c.reshape(BINS, TAIL_BINS // BINS).sum(axis=1) for t, c in tails.counts.items()}
    panels = ((axes[0], top1, "teacher top-1 probability"), (axes[1], tail_counts, "tail mass (1 - kept top-k)"))
    for ax, counts, title in panels:
        for color, (tau, c) in zip(itertools.cycle(COLORS), counts.items()):
            ax.stairs(c / max(c.sum(), 1), edges, color=color, linewidth=1.5, label=f"tau {tau:g}")
        ax.set(title=title, xlabel="probability", ylabel="fraction of (sample, view)s", yscale="log", xlim=(0, 1))
        ax.legend(fontsize=8)
    note = f", {damaged} damaged skipped" if damaged else ""
    fig.suptitle(
        f"{seen} (sample, view)s from {len(chosen) - damaged} of {int(done.sum())} finished units{note}; "
        f"top-{cache.meta.topk} kept",
        fontsize=10,
    )
    return save(fig, path)


def bytes_picture(cache: Cache, done: np.ndarray, path: str) -> str:
    """Stored bytes of each array per (sample, view) of the finished units: what the cache costs, and where."""
    meta = cache.meta
    sample_views = sum(len(meta.block_views(b)) * meta.shards[s].count for b, s in zip(*np.nonzero(done), strict=True))
    fig, ax = new_figure(9, 3.2)
    if not sample_views:
        placeholder(ax, "no finished unit yet")
        return save(fig, path)
    sizes = {name: storage.tree_size(f"{cache.url.rstrip('/')}/{name}") for name in ARRAYS}
    total = cache.nbytes_stored()
    sizes["metadata"] = max(total - sum(sizes.values()), 0)
    names = [n for n in sizes if sizes[n]]
    per = [sizes[n] / sample_views for n in names]
    ax.barh(names, per, color=COLORS[0])
    for y, value in enumerate(per):
        ax.text(value, y, f" {value:.2f}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="bytes per (sample, view)", xlim=(0, max(per) * 1.2))
    ax.set_title(
        f"{total / sample_views:.2f} bytes per (sample, view) in all: {total:,} bytes for {sample_views:,} "
        f"(sample, view)s, top-{meta.topk}, {len(meta.temperatures)} temperature(s)",
        fontsize=10,
    )
    return save(fig, path)


def cache_pictures(url: str, out: str, units: int) -> list[str]:
    """The three cache pictures, written to ``out``; returns their paths."""
    cache = open_cache(url)
    done = cache.done_mask()
    return [
        units_picture(cache, done, os.path.join(out, "cache-units.png")),
        targets_picture(cache, done, units, os.path.join(out, "cache-targets.png")),
        bytes_picture(cache, done, os.path.join(out, "cache-bytes.png")),
    ]
