"""The identity of a run, and which resumes continue it: a checkpoint records what makes its run that run
(shards, caches, model, recipe, seeds, loss), and a resume is refused, naming the field, when anything of it
differs, or when it would skip or repeat samples or jump the learning-rate schedule."""

from __future__ import annotations

from typing import Any

from pipeline.errors import ConfigError
from pipeline.phase2.inputs import RunData
from pipeline.train_options import TrainConfig


def run_identity(cfg: TrainConfig, data: RunData) -> dict[str, Any]:
    """What makes a run this run: a resume finds all of it unchanged (``checkpoint.check_resumable``)."""
    return {
        "shards": [[s.name, s.count] for s in data.shards],  # in order, as the caches resolve them
        "caches": [c.meta.fingerprint for c in data.caches],
        "model": cfg.model,
        "model_kwargs": dict(cfg.model_kwargs),
        "num_classes": data.num_classes,
        "recipe": data.recipe.to_dict(),
        "seed": data.seed,
        "repeats": data.repeats,
        "run_seed": data.seed if cfg.run_seed is None else cfg.run_seed,
        "distillation": cfg.distillation,
        "teacher_weights": list(data.weights),
    }


# Settings that fix which samples the steps of an epoch hold: a mid-epoch checkpoint can only be
# continued with the same ones. At an epoch end only the global batch must stay (the schedule counts
# optimizer steps).
_STREAM_FIELDS = ("batch_size", "accum_steps", "workers", "shuffle_buffer", "max_steps_per_epoch")


def _first_difference(name: str, before: Any, now: Any) -> str:
    if name == "shards" and isinstance(before, list) and isinstance(now, list):
        for i, (a, b) in enumerate(zip(before, now, strict=False)):
            if list(a) != list(b):
                return f"shard {i} is {tuple(b)} now, {tuple(a)} in the run (same shards in another order?)"
        return f"{len(now)} shards now, {len(before)} in the run"
    if name == "caches":
        return f"cache fingerprint(s) {[c[:12] for c in now]} now, {[c[:12] for c in before]} in the run"
    return f"{now!r} now, {before!r} in the run"


def check_resumable(cfg: TrainConfig, state: dict[str, Any], world: int, path: str, identity: dict[str, Any]) -> None:
    """Refuse a resume that would not continue the same run, skip or repeat samples, or jump the
    learning-rate schedule, naming the field."""
    if "identity" not in state:
        raise ConfigError(f"{path} was written by an older stillroom that did not record its run: start over")
    for name, now in identity.items():
        before = state["identity"].get(name)
        if before != now:
            raise ConfigError(
                f"--resume: {path} belongs to another run: {name}: {_first_difference(name, before, now)}; "
                "a resume continues the same run (another --out, or --force-new, starts a new one)"
            )
    old = state.get("config", {})
    old_world = int(state.get("world", world))
    if int(state.get("step_in_epoch", 0)):
        where = f"{path} was taken mid-epoch (epoch {state['epoch']}, step {state['step_in_epoch']})"
        if old_world != world:
            raise ConfigError(f"{where} on {old_world} ranks, now {world}: resume on {old_world} ranks")
        for name in _STREAM_FIELDS:
            if name in old and old[name] != getattr(cfg, name):
                raise ConfigError(
                    f"{where} with --{name.replace('_', '-')} {old[name]}, now {getattr(cfg, name)}: it would skip "
                    f"or repeat samples; resume with --{name.replace('_', '-')} {old[name]}"
                )
    if "batch_size" in old:
        before = old["batch_size"] * old_world * old.get("accum_steps", 1)
        now = cfg.batch_size * world * cfg.accum_steps
        if before != now:
            raise ConfigError(
                f"{path}: the global batch was {before} (--batch-size x ranks x --accum-steps), now {now}: "
                "the learning-rate schedule counts optimizer steps; keep the global batch when resuming"
            )
