"""The models of a run: its student, and in live mode its teachers (each cache's, proven to be the one the
cache recorded, or the ``--teacher`` names without a cache)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.cache import Cache
from pipeline.errors import CheckpointError, ConfigError
from pipeline.models.build import Normalized, build_student
from pipeline.models.teacher import TeacherWeights, is_recorded, load_teacher, recorded_weights, teacher_weights
from pipeline.phase2.inputs import RunData
from pipeline.train_options import TrainConfig


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


def live_teachers(cfg: TrainConfig, data: RunData, device: torch.device) -> list[nn.Module]:
    """The teachers run in the loop by ``--teacher-mode live``: each cache's, proven to be the one the cache
    recorded (the SHA-256 of its weights' file), or the ``--teacher`` names without a cache."""
    if data.caches:
        named = [(c.meta.teacher["name"], w, c.meta.teacher.get("kwargs")) for c, w in _cache_weights(cfg, data)]
    else:
        named = [(n, w, cfg.teacher_kwargs) for n, w in _named_weights(cfg)]
    return [load_teacher(name, data.num_classes, w, device, kwargs)[0] for name, w, kwargs in named]


def _named_weights(cfg: TrainConfig) -> list[tuple[str, TeacherWeights]]:
    """Without a cache: each ``--teacher`` with its ``--teacher-checkpoint``, or timm's pretrained weights."""
    names = list(cfg.teacher)
    if not names:
        raise ConfigError("--teacher-mode live needs --teacher NAME (there is no cache to take it from)")
    if cfg.teacher_pretrained and not cfg.teacher_checkpoint:
        return [(n, teacher_weights(n, None, True, cfg.teacher_kwargs)) for n in names]
    if len(cfg.teacher_checkpoint) != len(names):
        raise ConfigError(
            f"--teacher-mode live: {len(names)} teacher(s) but {len(cfg.teacher_checkpoint)} checkpoint(s)"
        )
    return [(n, TeacherWeights(path)) for n, path in zip(names, cfg.teacher_checkpoint, strict=True)]


def _cache_weights(cfg: TrainConfig, data: RunData) -> list[tuple[Cache, TeacherWeights]]:
    """Each cache's teacher weights: one ``--teacher-checkpoint`` per cache, or per cache whose teacher was
    not timm's pretrained weights (those are found again by name); each file's SHA-256 must be the recorded one."""
    recorded = [c.meta.teacher for c in data.caches]
    given = list(cfg.teacher_checkpoint)
    by_name = [i for i, t in enumerate(recorded) if t.get("pretrained")]
    if len(given) not in (len(recorded), len(recorded) - len(by_name)):
        raise ConfigError(
            f"--teacher-mode live: {len(recorded)} cache(s), {len(by_name)} of them made with timm's pretrained "
            f"weights: give --teacher-checkpoint for {len(recorded) - len(by_name)} (the others), or for all "
            f"{len(recorded)}; got {len(given)}"
        )
    out = []
    for i, (cache, teacher) in enumerate(zip(data.caches, recorded, strict=True)):
        checkpoint = given.pop(0) if len(given) == len(recorded) or i not in by_name else None
        weights = recorded_weights(teacher, checkpoint, f"cache {cache.url!r}")
        if not is_recorded(weights, teacher):
            raise CheckpointError(
                f"{weights.describe()} is not the teacher of cache {cache.url!r} (sha256 {weights.sha256[:16]}..., "
                f"the cache's {str(teacher['checkpoint_sha256'])[:16]}...)"
            )
        out.append((cache, weights))
    return out
