"""What a training run trains on: its shards, the recipe and seed of their views, the caches' targets
and, in live mode, the teachers. Resolved once from the config, before any work or any write.

Several caches may be given when they were made over the same views (equal views identity: shards and
counts, recipe, seed, views and row geometry): their rows then hold targets for the very same pixels, and
the task combines their teachers (:mod:`pipeline.models.task`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pipeline.cache import Cache, check_run, diff_fields, open_cache
from pipeline.errors import ConfigError
from pipeline.models.targets import Reduction, TailMass, reduction_of, target_temperature
from pipeline.shards.lists import ShardInfo, check_same_classes, class_names, load_shard_list, num_classes_from_sidecar
from pipeline.train_options import TrainConfig
from pipeline.views.plans import EpochPlan, epoch_plan
from pipeline.views.recipe import Recipe, make_recipe

log = logging.getLogger(__name__)


@dataclass
class RunData:
    """What a run trains on: shards, the recipe and seed of their views, and the caches of their targets."""

    shards: list[ShardInfo]
    val_shards: list[ShardInfo]
    recipe: Recipe
    seed: int
    num_classes: int
    caches: list[Cache]
    reductions: list[Reduction]  # per teacher: how its logits are (or were) reduced
    weights: list[float]  # per teacher, summing to 1
    repeats: int
    classes: list[str] | None  # the labels' class names, when pack recorded them

    @property
    def cache(self) -> Cache | None:
        """The first cache (its views are every cache's)."""
        return self.caches[0] if self.caches else None

    @property
    def num_views(self) -> int:
        """Views available per sample: the caches', or unbounded when views are replayed without one."""
        return self.caches[0].meta.views if self.caches else 1 << 30

    def plan(self, epoch: int) -> EpochPlan:
        return epoch_plan(epoch, self.repeats, self.num_views)


def _open_caches(cfg: TrainConfig) -> list[Cache]:
    """Every ``--cache``, refused unless they hold targets for the same views as the first."""
    caches = [open_cache(url) for url in cfg.cache] if cfg.distillation != "none" else []
    for other in caches[1:]:
        first = caches[0]
        if other.meta.views_fingerprint != first.meta.views_fingerprint:
            diffs = diff_fields(first.meta.views_identity(), other.meta.views_identity())
            raise ConfigError(
                f"--cache {other.url!r} was not made over the views of --cache {first.url!r}: "
                f"{'; '.join(diffs) or 'views fingerprint differs'} (make it with cache-teacher --like {first.url})"
            )
    return caches


def _reductions(cfg: TrainConfig, caches: list[Cache]) -> list[Reduction]:
    if caches:
        return [reduction_of(c.meta) for c in caches]
    return [Reduction(cfg.topk, tuple(cfg.temperatures))] * max(len(cfg.teacher_checkpoint), 1)


def _check_temperatures(cfg: TrainConfig, reductions: list[Reduction], caches: list[Cache]) -> None:
    tau = target_temperature(cfg.distillation, cfg.tau, len(reductions))
    for i, how in enumerate(reductions):
        if tau is not None and tau not in how.temperatures:
            where = f"cache {caches[i].url!r}" if caches else "--temperatures"
            why = "--tau" if cfg.distillation == "soft" else "several teachers' hard targets (tau 1)"
            raise ConfigError(f"{why} {tau} is not a cached temperature of {where} ({list(how.temperatures)})")


def resolve_data(cfg: TrainConfig) -> RunData:
    """Open the caches (if distilling) and the shard lists; settle the recipe, seed and class count."""
    caches = _open_caches(cfg)
    cache = caches[0] if caches else None
    counts = {s.name: s.count for s in cache.meta.shards} if cache else None
    shards = load_shard_list(cfg.shards, counts, label_key=cfg.label_key)
    val_shards = load_shard_list(cfg.val_shards, label_key=cfg.label_key) if cfg.val_shards else []
    if cache is not None:
        meta = cache.meta
        recipe = make_recipe(cfg.recipe if cfg.recipe is not None else meta.recipe, cfg.img_size)
        seed, num_classes = (cfg.seed if cfg.seed is not None else meta.seed), meta.num_classes
        repeats = cfg.repeats or recipe.repeats
        if repeats not in (1, recipe.repeats):
            raise ConfigError(
                f"--repeats {repeats}: the cache's mixing partners were drawn for {recipe.repeats} repeats "
                f"(recipe.repeats); train with --repeats {recipe.repeats} or 1, or cache with --repeats {repeats}"
            )
    else:
        recipe = make_recipe(cfg.recipe or "deit", cfg.img_size, cfg.repeats)
        seed = cfg.seed or 0
        num_classes = cfg.num_classes or num_classes_from_sidecar(shards[0].url) or 0
        repeats = recipe.repeats
    if not num_classes:
        raise ConfigError("number of classes unknown: pass --num-classes (no cache, no pack sidecar)")
    reductions = _reductions(cfg, caches)
    _check_temperatures(cfg, reductions, caches)
    weights = list(cfg.teacher_weights) or [1.0] * len(reductions)
    weights = [w / sum(weights) for w in weights]
    classes = list(cache.meta.classes) if cache and cache.meta.classes else class_names(cfg.shards)
    val_classes = class_names(cfg.val_shards) if cfg.val_shards else None
    if classes and val_classes:
        check_same_classes(classes, val_classes, f"--val-shards {cfg.val_shards[0]!r}")
    return RunData(shards, val_shards, recipe, seed, num_classes, caches, reductions, weights, repeats, classes)


TAIL_WARNING = 0.2  # a mean tail mass above this at the soft temperature is worth a loud line


def _warn_tail(cache: Cache, shard: int, view: int, tau: float) -> None:
    """Warn when the soft targets at ``tau`` miss much of the teacher's mass (measured on one unit)."""
    tails = TailMass(cache.meta)
    unit = cache.read_block(cache.meta.block_of(view), shard)
    tails.add(unit, unit.labels >= 0)
    mean = tails.summary().get(str(tau), {}).get("mean", 0.0)
    if mean > TAIL_WARNING:
        log.warning(
            "soft distillation at tau %g: the cache keeps %d classes per view, which miss %.0f%% of the teacher's "
            "probability on average (cache-status: tail_mass); that mass is spread uniformly, so the soft target "
            "differs from DeiT's full-logit one (docs/recipe.md gives the error; cache more classes, or a lower tau)",
            tau,
            cache.meta.topk,
            100 * mean,
        )


def check_caches(data: RunData, first_epoch: int, epochs: int, tau: float | None = None) -> list[int] | None:
    """Refuse, before any work, a cache that does not match the run or lacks a view it needs.

    Returns:
        The cache's shard index of each run shard (the same in every cache: same views), or None.
    """
    if not data.caches:
        return None
    views = {v for e in range(first_epoch, epochs) for v in data.plan(e).views}
    rows = [check_run(c, data.shards, data.recipe.to_dict(), data.seed, views) for c in data.caches]
    if tau is not None:
        for cache in data.caches:
            _warn_tail(cache, rows[0][0], data.plan(first_epoch).views[0], tau)
    if epochs > data.num_views:
        log.warning(
            "training %d epochs on a cache of %d views: views repeat (a run of E epochs uses E views of each "
            "sample, whatever --repeats; here each view serves up to %d epochs)",
            epochs,
            data.num_views,
            -(-epochs // data.num_views),
        )
    return rows[0]
