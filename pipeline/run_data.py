"""What a training run trains on: its shards, the recipe and seed of their views, the cache's targets
and, in live mode, the teacher. Resolved once from the config, before any work."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .cache import Cache, open_cache
from .errors import ConfigError
from .models import Normalized, build_student, load_teacher
from .options import TrainConfig
from .recipe import Recipe, make_recipe
from .samplers import EpochPlan, epoch_plan
from .shards import ShardInfo, check_same_classes, class_names, load_shard_list, num_classes_from_sidecar


@dataclass
class RunData:
    """What a run trains on: shards, the recipe and seed of their views, and the cache's targets."""

    shards: list[ShardInfo]
    val_shards: list[ShardInfo]
    recipe: Recipe
    seed: int
    num_classes: int
    cache: Cache | None
    topk: int
    temperatures: list[float]
    repeats: int
    classes: list[str] | None  # the labels' class names, when pack recorded them

    @property
    def num_views(self) -> int:
        """Views available per sample: the cache's, or unbounded when views are replayed without one."""
        return self.cache.meta.views if self.cache else 1 << 30

    def plan(self, epoch: int) -> EpochPlan:
        return epoch_plan(epoch, self.repeats, self.num_views)


def resolve_data(cfg: TrainConfig) -> RunData:
    """Open the cache (if distilling) and the shard lists; settle the recipe, seed and class count."""
    cache = open_cache(cfg.cache) if cfg.cache and cfg.distillation != "none" else None
    counts = {s.name: s.count for s in cache.meta.shards} if cache else None
    shards = load_shard_list(cfg.shards, counts, label_key=cfg.label_key)
    val_shards = load_shard_list(cfg.val_shards, label_key=cfg.label_key) if cfg.val_shards else []
    if cache is not None:
        meta = cache.meta
        recipe = make_recipe(cfg.recipe if cfg.recipe is not None else meta.recipe, cfg.img_size)
        seed, num_classes = (cfg.seed if cfg.seed is not None else meta.seed), meta.num_classes
        topk, temperatures = meta.topk, list(meta.temperatures)
        if cfg.distillation == "soft" and float(cfg.tau) not in temperatures:
            raise ConfigError(f"--tau {cfg.tau} is not a cached temperature (cache has {temperatures})")
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
        topk, temperatures, repeats = cfg.topk, list(cfg.temperatures), recipe.repeats
    if not num_classes:
        raise ConfigError("number of classes unknown: pass --num-classes (no cache, no pack sidecar)")
    classes = list(cache.meta.classes) if cache and cache.meta.classes else class_names(cfg.shards)
    val_classes = class_names(cfg.val_shards) if cfg.val_shards else None
    if classes and val_classes:
        check_same_classes(classes, val_classes, f"--val-shards {cfg.val_shards[0]!r}")
    return RunData(shards, val_shards, recipe, seed, num_classes, cache, topk, temperatures, repeats, classes)


def student_for(cfg: TrainConfig, data: RunData) -> tuple[Normalized, dict[str, Any]]:
    """The run's student and the metadata ``evaluate`` rebuilds it from."""
    return build_student(
        cfg.model,
        data.num_classes,
        cfg.model_kwargs,
        drop_path=cfg.drop_path,
        distilling=cfg.distillation != "none",
        recipe=data.recipe,
        classes=data.classes,
    )


def live_teacher(cfg: TrainConfig, data: RunData, device: torch.device) -> nn.Module:
    """The teacher run in the loop by ``--teacher-mode live`` (the cache's, unless ``--teacher`` says)."""
    name = cfg.teacher or (data.cache.meta.teacher["name"] if data.cache else None)
    if not name:
        raise ConfigError("--teacher-mode live needs --teacher NAME (there is no cache to take it from)")
    return load_teacher(name, data.num_classes, cfg.teacher_checkpoint, device, cfg.teacher_kwargs)[0]
