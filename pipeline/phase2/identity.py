"""The identity of a run, and which resumes continue it.

A checkpoint records every option that changes what is trained (the options whose ``on_resume`` role is
``RUN`` or ``TRAINING``, :mod:`pipeline.train_options`), as the run resolved them (the shards' names and
counts, the caches' fingerprints, the recipe a cache gave). A resume is refused, naming the option and both
values, when one of them differs: a ``RUN`` option always (another value is another run), a ``TRAINING``
option unless ``--allow-change`` names it; then the change is returned, to be logged and recorded. ``STREAM``
options (the batch geometry) may not change mid-epoch, and at an epoch end the global batch must stay.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any

from pipeline import storage
from pipeline.config import default_of, flag_name
from pipeline.errors import ConfigError
from pipeline.phase2.inputs import RunData
from pipeline.train_options import RUN, STREAM, TRAINING, TrainConfig, resume_role

log = logging.getLogger(__name__)

# Options that say which teacher a run without a cache distils from; with a cache (or no teacher) they play no
# part: the caches' fingerprints name their teachers, and a live teacher is proven to be the cache's.
TEACHER_OPTIONS = ("teacher", "teacher_checkpoint", "teacher_pretrained", "teacher_kwargs", "topk", "temperatures")


def recorded_options() -> list[str]:
    """The options a checkpoint records: every one whose role is RUN or TRAINING (each option declares its role)."""
    return [f.name for f in dataclasses.fields(TrainConfig) if resume_role(f.name) in (RUN, TRAINING)]


def _resolved(cfg: TrainConfig, data: RunData) -> dict[str, Any]:
    """The options whose recorded value is what the run made of them, not the flag as given."""
    out: dict[str, Any] = {
        "shards": [[s.name, s.count] for s in data.shards],  # in order, as the caches resolve them
        "cache": [c.meta.fingerprint for c in data.caches],
        "recipe": data.recipe.to_dict(),
        "img_size": data.recipe.img_size,
        "repeats": data.repeats,
        "seed": data.seed,
        "run_seed": data.seed if cfg.run_seed is None else cfg.run_seed,
        "num_classes": data.num_classes,
        "teacher_weights": list(data.weights),
    }
    if data.caches or cfg.distillation == "none":
        out.update(dict.fromkeys(TEACHER_OPTIONS, None))
    else:  # a moved file is the same teacher; other bytes under the same name are not
        out["teacher_checkpoint"] = [storage.sha256_file(path) for path in cfg.teacher_checkpoint]
    return out


def run_identity(cfg: TrainConfig, data: RunData) -> dict[str, Any]:
    """What makes a run this run: a resume finds all of it unchanged, or names what changed (``check_resumable``)."""
    resolved = _resolved(cfg, data)
    return {name: copy.deepcopy(resolved.get(name, getattr(cfg, name))) for name in recorded_options()}


def _recorded(state: dict[str, Any], path: str) -> dict[str, Any]:
    """The identity ``last.pth`` recorded, completed for a checkpoint written before an option was recorded.

    Such an option is taken from the checkpoint's config (every checkpoint holds its run's options); one the
    config lacks too is newer than the checkpoint, and the run had its default (a new option's default keeps
    the behaviour from before it); a teacher option of a run without a cache cannot be known: not checked.
    Each assumption is one warning.
    """
    ident, config = dict(state["identity"]), state.get("config", {})
    if "caches" in ident:  # the name stillroom 0.x recorded the caches' fingerprints under
        ident.setdefault("cache", ident.pop("caches"))
    if "img_size" not in ident and isinstance(ident.get("recipe"), dict):
        ident["img_size"] = ident["recipe"].get("img_size")
    assumed, unknown = [], []
    for name in recorded_options():
        if name in ident:
            continue
        if name in TEACHER_OPTIONS:
            if ident.get("cache") or ident.get("distillation") == "none":
                ident[name] = None
            else:
                unknown.append(name)
        elif name in config:
            ident[name] = config[name]
        else:
            ident[name] = default_of(TrainConfig.__dataclass_fields__[name])
            assumed.append(name)
    if assumed:
        log.warning("%s predates options %s: its run had their defaults", path, ", ".join(assumed))
    if unknown:
        log.warning("%s did not record %s (live teacher without a cache): not checked", path, ", ".join(unknown))
    return ident


def _first_difference(name: str, before: Any, now: Any) -> str:
    if name == "shards" and isinstance(before, list) and isinstance(now, list):
        for i, (a, b) in enumerate(zip(before, now, strict=False)):
            if list(a) != list(b):
                return f"shard {i} is {tuple(b)} now, {tuple(a)} in the run (same shards in another order?)"
        return f"{len(now)} shards now, {len(before)} in the run"
    if name == "cache" and isinstance(before, list) and isinstance(now, list):
        return f"cache fingerprint(s) {[c[:12] for c in now]} now, {[c[:12] for c in before]} in the run"
    return f"{now!r} now, {before!r} in the run"


def check_resumable(
    cfg: TrainConfig, state: dict[str, Any], world: int, path: str, identity: dict[str, Any]
) -> list[dict[str, Any]]:
    """Refuse a resume that would not continue the same run, change what is trained without ``--allow-change``,
    skip or repeat samples, or jump the learning-rate schedule, naming the option and both values.

    Returns:
        The changes ``--allow-change`` let through, each ``{"field", "before", "now", "epoch", "step"}`` (where
        the run was) and logged as a warning.
    """
    if "identity" not in state:
        raise ConfigError(f"{path} was written by an older stillroom that did not record its run: start over")
    recorded, changes = _recorded(state, path), []
    for name, now in identity.items():
        if name not in recorded or recorded[name] == now:
            continue
        before = recorded[name]
        if resume_role(name) == RUN:
            raise ConfigError(
                f"--resume: {path} belongs to another run: {name}: {_first_difference(name, before, now)}; "
                "a resume continues the same run (another --out, or --force-new, starts a new one)"
            )
        if name not in cfg.allow_change:
            raise ConfigError(
                f"--resume: {path} was trained with {flag_name(name)} {before!r}, now {now!r}: a resume continues "
                f"the run as it was set; add --allow-change {name} to go on with the new value (logged in "
                f"metrics.jsonl), or resume with {flag_name(name)} {before!r}"
            )
        at = {"epoch": int(state["epoch"]), "step": int(state["step_in_epoch"])}
        changes.append({"field": name, "before": before, "now": now, **at})
        log.warning("--allow-change %s: %r in the run, %r from %s on", name, before, now, at)
    if cfg.epochs < int(state.get("epoch", 0)):
        raise ConfigError(f"--epochs {cfg.epochs}: {path} has trained {state['epoch']} epochs already")
    _check_stream(cfg, state, world, path)
    return changes


def _check_stream(cfg: TrainConfig, state: dict[str, Any], world: int, path: str) -> None:
    """Mid-epoch, the options that decide which samples a step holds must be the run's; at any resume the global
    batch must be (the schedule counts optimizer steps)."""
    old = state.get("config", {})
    old_world = int(state.get("world", world))
    if int(state.get("step_in_epoch", 0)):
        where = f"{path} was taken mid-epoch (epoch {state['epoch']}, step {state['step_in_epoch']})"
        if old_world != world:
            raise ConfigError(f"{where} on {old_world} ranks, now {world}: resume on {old_world} ranks")
        for name in (f.name for f in dataclasses.fields(TrainConfig) if resume_role(f.name) == STREAM):
            if name in old and old[name] != getattr(cfg, name):
                raise ConfigError(
                    f"{where} with {flag_name(name)} {old[name]}, now {getattr(cfg, name)}: it would skip "
                    f"or repeat samples; resume with {flag_name(name)} {old[name]}"
                )
    if "batch_size" in old:
        before = old["batch_size"] * old_world * old.get("accum_steps", 1)
        now = cfg.batch_size * world * cfg.accum_steps
        if before != now:
            raise ConfigError(
                f"{path}: the global batch was {before} (--batch-size x ranks x --accum-steps), now {now}: "
                "the learning-rate schedule counts optimizer steps; keep the global batch when resuming"
            )
