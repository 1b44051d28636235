"""Phase 2: train a student (or a teacher, with ``distillation: none``) from replayed views.

The loop is generic: the :class:`~pipeline.task.DistillationTask` owns forward and loss. Every
stateful part (model, optimizer, scheduler, scaler, EMA, data position, RNG) goes through one
checkpoint dict; DDP is applied after the model is built.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from . import checkpoint as ckpt
from .cache import Cache, CacheError, check_versions, diff_fields, open_cache
from .data import StreamSpec, epoch_batches, rank_shards, steps_per_epoch, view_for_epoch
from .distributed import Dist, all_min, barrier, init, shutdown
from .evaluate import evaluate
from .models import Normalized, create, load_teacher, model_stats, resolve_device
from .progress import progress_bar
from .recipe import Recipe, make_recipe
from .seeding import stable_seed
from .shards import ShardInfo, load_shard_list, num_classes_from_sidecar
from .task import DistillationTask

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Options of ``stillroom train-student`` (YAML keys have the same names). Defaults are DeiT's."""

    shards: str = ""
    val_shards: str | None = None
    cache: str | None = None
    out: str = "runs/student"
    model: str = "deit_small_distilled_patch16_224"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None
    distillation: str = "hard"
    alpha: float = 0.5
    tau: float = 1.0
    teacher_mode: str = "cached"
    teacher: str | None = None
    teacher_checkpoint: str | None = None
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)
    topk: int = 10
    temperatures: list[float] = field(default_factory=lambda: [1.0, 3.0])
    recipe: Any = None  # None: the cache's recipe (cached mode) or 'deit'
    img_size: int | None = None
    seed: int | None = None  # None: the cache's seed, or 0
    epochs: int = 300
    batch_size: int = 64
    accum_steps: int = 1
    lr: float = 5e-4  # for a global batch of 512; scaled linearly
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_epochs: int = 5
    weight_decay: float = 0.05
    clip_grad: float | None = None
    drop_path: float = 0.1
    model_ema: bool = False
    model_ema_decay: float = 0.99996
    amp: bool = True
    workers: int = 2
    shuffle_buffer: int | None = None
    eval_every: int = 1
    eval_batch_size: int = 256
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints; 0 = epoch ends only
    log_every: int = 20
    max_steps_per_epoch: int | None = None
    resume: bool = False
    device: str = "cpu"
    on_error: str = "raise"
    progress: bool = True
    deterministic: bool = False


class MetricsLog:
    """JSON lines, one event per line, appended by rank 0 (``metrics.jsonl``)."""

    def __init__(self, path: str, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, event: str, **fields: Any) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"event": event, "time": round(time.time(), 3), **fields}) + "\n")


@dataclass
class Setup:
    """The resolved pieces of a training run."""

    cfg: TrainConfig
    shards: list[ShardInfo]
    val_shards: list[ShardInfo]
    recipe: Recipe
    seed: int
    num_classes: int
    cache: Cache | None
    cache_rows: list[int] | None
    num_views: int
    topk: int
    temperatures: list[float]


def check_cache(
    cache: Cache, shards: list[ShardInfo], recipe: Recipe, seed: int, first_epoch: int, epochs: int
) -> list[int]:
    """Refuse a cache that does not match or lacks a view this run needs; return cache rows.

    Raises:
        CacheError: naming the differing field, the missing shard or the missing units.
    """
    meta = cache.meta
    diffs = diff_fields({"recipe": recipe.to_dict(), "seed": seed}, meta)
    if diffs:
        raise CacheError(f"cache {cache.url!r} does not match this training run: {'; '.join(diffs)}")
    by_name = {s["name"]: (i, s["count"]) for i, s in enumerate(cache.shards)}
    rows = []
    for s in shards:
        if s.name not in by_name:
            raise CacheError(f"shard {s.name!r} ({s.url}) is not in cache {cache.url!r}; cache-teacher it first")
        i, n = by_name[s.name]
        if n != s.count:
            raise CacheError(f"shard {s.name!r} has {s.count} samples but cache {cache.url!r} recorded {n}")
        rows.append(i)
    done = cache.done_counts()
    views = int(meta["views"])
    needed = sorted({view_for_epoch(e, views) // int(meta["view_block"]) for e in range(first_epoch, epochs)})
    missing = [(b, s.name) for b in needed for s, r in zip(shards, rows, strict=True) if done[b, r] < 0]
    if missing:
        units = [
            f"views {cache.block_views(b).start}-{cache.block_views(b).stop - 1} of shard {name!r}"
            for b, name in missing[:8]
        ]
        more = f" and {len(missing) - 8} more (see stillroom cache-status)" if len(missing) > 8 else ""
        raise CacheError(
            f"cache {cache.url!r} is incomplete: {len(missing)} unit(s) this run needs are missing: "
            f"{', '.join(units)}{more}; run cache-teacher again to finish it"
        )
    if epochs > views:
        log.warning(
            "training %d epochs on a cache of %d views: views repeat (epoch e uses view e mod %d)", epochs, views, views
        )
    check_versions(meta)
    return rows


def resolve(cfg: TrainConfig) -> Setup:
    """Turn a config into shards, recipe, cache and targets settings, validating all of it."""
    if cfg.distillation not in ("none", "hard", "soft"):
        raise ValueError(f"--distillation {cfg.distillation!r}: expected none, hard or soft")
    if cfg.teacher_mode not in ("cached", "live"):
        raise ValueError(f"--teacher-mode {cfg.teacher_mode!r}: expected cached or live")
    cached = cfg.distillation != "none" and cfg.teacher_mode == "cached"
    if cached and not cfg.cache:
        raise ValueError("--distillation hard/soft with --teacher-mode cached needs --cache")
    cache = open_cache(cfg.cache) if cfg.cache and cfg.distillation != "none" else None
    counts = {s["name"]: s["count"] for s in cache.shards} if cache else None
    shards = load_shard_list(cfg.shards, counts)
    val_shards = load_shard_list(cfg.val_shards) if cfg.val_shards else []
    if cache is not None:
        recipe = make_recipe(cfg.recipe if cfg.recipe is not None else cache.meta["recipe"], cfg.img_size)
        seed = cfg.seed if cfg.seed is not None else int(cache.meta["seed"])
        num_classes = int(cache.meta["num_classes"])
    else:
        recipe = make_recipe(cfg.recipe or "deit", cfg.img_size)
        seed = cfg.seed or 0
        num_classes = cfg.num_classes or num_classes_from_sidecar(shards[0].url) or 0
    if not num_classes:
        raise ValueError("number of classes unknown: pass --num-classes (no cache, no pack sidecar)")
    if cfg.distillation == "soft":
        temps = cache.meta["temperatures"] if cache else cfg.temperatures
        if float(cfg.tau) not in [float(t) for t in temps]:
            raise ValueError(f"--tau {cfg.tau} is not a cached temperature (cache has {temps})")
    return Setup(
        cfg=cfg,
        shards=shards,
        val_shards=val_shards,
        recipe=recipe,
        seed=seed,
        num_classes=num_classes,
        cache=cache,
        cache_rows=None,
        num_views=int(cache.meta["views"]) if cache else 1 << 30,
        topk=int(cache.meta["topk"]) if cache else cfg.topk,
        temperatures=list(cache.meta["temperatures"]) if cache else list(cfg.temperatures),
    )


def build_student(s: Setup) -> tuple[nn.Module, dict[str, Any]]:
    cfg = s.cfg
    kwargs = dict(cfg.model_kwargs)
    if cfg.drop_path:
        kwargs.setdefault("drop_path_rate", cfg.drop_path)
    model = create(cfg.model, s.num_classes, **kwargs)
    if hasattr(model, "set_distilled_training"):
        model.set_distilled_training(cfg.distillation != "none")
    elif cfg.distillation != "none":
        log.warning("%s has no distillation head: the distillation loss trains its only head", cfg.model)
    mean, std = model_stats(model)
    meta = {
        "name": cfg.model,
        "kwargs": {k: v for k, v in kwargs.items() if k != "drop_path_rate"},
        "crop_pct": s.recipe.crop_pct,
        "num_classes": s.num_classes,
        "img_size": s.recipe.img_size,
        "mean": list(mean),
        "std": list(std),
    }
    return Normalized(model, mean, std), meta


def build_live_teacher(s: Setup, device: torch.device) -> nn.Module:
    cfg = s.cfg
    name = cfg.teacher or (s.cache.meta["teacher"]["name"] if s.cache else None)
    if not name or not cfg.teacher_checkpoint:
        raise ValueError("--teacher-mode live needs --teacher NAME and --teacher-checkpoint FILE")
    return load_teacher(name, s.num_classes, cfg.teacher_checkpoint, device, cfg.teacher_kwargs)[0]


def _state(
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    ema: Any,
    epoch: int,
    step: int,
    global_step: int,
    best: float,
    cfg: TrainConfig,
    model_meta: dict,
) -> dict[str, Any]:
    return {
        "model": model.model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "ema": ema.module.model.state_dict() if ema is not None else None,
        "epoch": epoch,
        "step_in_epoch": step,
        "global_step": global_step,
        "best_top1": best,
        "rng": ckpt.rng_state(),
        "config": dataclasses.asdict(cfg),
        "model_meta": model_meta,
    }


def _debug_record(folder: str | None, d: Dist, model: nn.Module, **fields: Any) -> None:
    """Test hook: with ``STILLROOM_DEBUG_DIR`` set, each rank appends the step's sample keys and a
    digest of its parameters to ``rank<r>.jsonl`` (to check DDP sharding and synchronisation)."""
    if not folder:
        return
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().numpy().tobytes())
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"rank{d.rank}.jsonl"), "a") as f:
        f.write(json.dumps({**fields, "params_sha256": h.hexdigest()}) + "\n")


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a training job. Returns the final metrics."""
    device = resolve_device(cfg.device)
    d = init(device.type)
    try:
        return _train(cfg, device, d)
    finally:
        shutdown(d)


def _train(cfg: TrainConfig, device: torch.device, d: Dist) -> dict[str, Any]:
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    s = resolve(cfg)
    os.makedirs(cfg.out, exist_ok=True)
    last_path, best_path = os.path.join(cfg.out, "last.pth"), os.path.join(cfg.out, "best.pth")
    state = ckpt.load(last_path) if cfg.resume and os.path.exists(last_path) else None
    if cfg.resume and state is None:
        log.warning("--resume: no checkpoint at %s, starting from scratch", last_path)
    first_epoch = int(state["epoch"]) if state else 0
    if s.cache is not None:
        s.cache_rows = check_cache(s.cache, s.shards, s.recipe, s.seed, first_epoch, cfg.epochs)

    torch.manual_seed(stable_seed("init", s.seed))  # same initial weights on every rank
    model, model_meta = build_student(s)
    model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    teacher = build_live_teacher(s, device) if cfg.distillation != "none" and cfg.teacher_mode == "live" else None

    global_batch = cfg.batch_size * d.world * cfg.accum_steps
    lr = cfg.lr * global_batch / 512.0
    optimizer = create_optimizer_v2(model.model, "adamw", lr=lr, weight_decay=cfg.weight_decay)
    steps0 = steps_per_epoch(s.shards, 0, s.seed, d.world, cfg.batch_size)
    if cfg.max_steps_per_epoch:
        steps0 = min(steps0, cfg.max_steps_per_epoch)
    if steps0 < 1:
        raise ValueError(f"batch size {cfg.batch_size} x {d.world} ranks is larger than the data of a rank")
    updates_per_epoch = max(steps0 // cfg.accum_steps, 1)
    scheduler, _ = create_scheduler_v2(
        optimizer,
        "cosine",
        num_epochs=cfg.epochs,
        warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr,
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
    )
    scaler = None  # bf16 autocast needs no loss scaling
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None
    global_step, best, start_step = 0, -1.0, 0
    # Drop path draws from the global generator: seed it once everything is built, so building a
    # live teacher (which consumes global draws for its init) cannot change the student's noise.
    torch.manual_seed(stable_seed("noise", s.seed, d.rank))
    if state:
        model.model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state["ema"] is not None:
            ema.module.model.load_state_dict(state["ema"])
        global_step, best, start_step = (
            int(state["global_step"]),
            float(state["best_top1"]),
            int(state["step_in_epoch"]),
        )
        # The schedule is rebuilt from this run's config (e.g. a larger --epochs) and fast-forwarded;
        # loading the stored scheduler state would keep the old run's length (t_initial).
        scheduler.step_update(num_updates=global_step)
        if d.rank == 0:
            ckpt.set_rng_state(state["rng"])
        else:  # the checkpoint holds rank 0's generator; other ranks draw fresh, distinct noise
            torch.manual_seed(stable_seed("noise", s.seed, d.rank, global_step))
        log.info("resumed from %s: epoch %d, step %d", last_path, first_epoch, start_step)

    task = DistillationTask(
        model,
        s.num_classes,
        cfg.distillation,
        cfg.alpha,
        cfg.tau,  # type: ignore[arg-type]
        s.temperatures,
        s.recipe.smoothing,
        teacher,
        s.topk,
        amp=cfg.amp,
    )
    train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if d.enabled else model
    task.student = train_model
    metrics = MetricsLog(os.path.join(cfg.out, "metrics.jsonl"), d.main)
    metrics.write(
        "start",
        world=d.world,
        global_batch=global_batch,
        lr=lr,
        num_classes=s.num_classes,
        distillation=cfg.distillation,
        teacher_mode=cfg.teacher_mode,
        first_epoch=first_epoch,
        start_step=start_step,
    )

    def save(epoch: int, step: int) -> None:
        if d.main:
            ckpt.save_atomic(
                _state(model, optimizer, scheduler, scaler, ema, epoch, step, global_step, best, cfg, model_meta),
                last_path,
            )

    debug_dir = os.environ.get("STILLROOM_DEBUG_DIR")
    result: dict[str, Any] = {}
    for epoch in range(first_epoch, cfg.epochs):
        view = view_for_epoch(epoch, s.num_views)
        steps = steps_per_epoch(s.shards, epoch, s.seed, d.world, cfg.batch_size)
        if cfg.max_steps_per_epoch:
            steps = min(steps, cfg.max_steps_per_epoch)
        spec = StreamSpec(
            shards=s.shards,
            shard_ids=rank_shards(s.shards, epoch, s.seed, d.rank, d.world),
            cache_rows=s.cache_rows if cfg.teacher_mode == "cached" and s.cache else None,
            cache_url=s.cache.url if s.cache and cfg.teacher_mode == "cached" else None,
            view=view,
            recipe=s.recipe,
            seed=s.seed,
            num_classes=s.num_classes,
            on_error=cfg.on_error,
        )  # type: ignore[arg-type]
        batches = epoch_batches(
            spec,
            cfg.batch_size,
            cfg.workers,
            cfg.shuffle_buffer or 2 * cfg.batch_size,
            stable_seed("batches", s.seed, epoch, d.rank),
            pin_memory=device.type == "cuda",
        )
        train_model.train()
        t0, seen, loss_sum, loss_n = time.perf_counter(), 0, 0.0, 0
        with progress_bar(
            f"epoch {epoch} (view {view})", total=steps, unit="step", enabled=cfg.progress and d.main
        ) as bar:
            for step in range(steps):
                batch = next(batches, None)
                if all_min(int(batch is not None), d, device) == 0:
                    log.warning("epoch %d: a rank ran out of data at step %d of %d", epoch, step, steps)
                    break
                if step < start_step:  # resuming mid-epoch: the data position is replayed, not retrained
                    bar.advance()
                    continue
                batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
                micro = (step + 1) % cfg.accum_steps != 0 and step + 1 != steps
                if d.enabled and micro:
                    with train_model.no_sync():
                        out = task(batch)
                        (out.loss / cfg.accum_steps).backward()
                else:
                    out = task(batch)
                    (out.loss / cfg.accum_steps).backward()
                if not micro:
                    if cfg.clip_grad:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    global_step += 1
                    scheduler.step_update(num_updates=global_step)
                    if ema is not None:
                        ema.update(model, step=global_step)
                if not math.isfinite(out.loss.item()):
                    raise FloatingPointError(f"loss is {out.loss.item()} at epoch {epoch} step {step}")
                _debug_record(
                    debug_dir,
                    d,
                    model,
                    epoch=epoch,
                    step=step,
                    global_step=global_step,
                    keys=batch["keys"],
                    loss=out.loss.item(),
                )
                seen += batch["pixels"].shape[0]
                loss_sum += out.loss.item()
                loss_n += 1
                rate = seen * d.world / max(time.perf_counter() - t0, 1e-9)
                cur_lr = optimizer.param_groups[0]["lr"]
                bar.advance()
                bar.set(loss=out.loss.item(), lr=cur_lr, img_s=rate)
                if cfg.log_every and (step + 1) % cfg.log_every == 0:
                    metrics.write(
                        "train",
                        epoch=epoch,
                        step=step + 1,
                        loss=out.loss.item(),
                        base_loss=out.base_loss,
                        distill_loss=out.distill_loss,
                        lr=cur_lr,
                        img_per_s=round(rate, 2),
                    )
                if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
                    save(epoch, step + 1)
        start_step = 0
        scheduler.step(epoch + 1)
        elapsed = time.perf_counter() - t0
        result = {
            "epoch": epoch,
            "view": view,
            "steps": loss_n,
            "train_loss": loss_sum / max(loss_n, 1),
            "img_per_s": round(seen * d.world / max(elapsed, 1e-9), 2),
            "epoch_s": round(elapsed, 3),
        }
        if s.val_shards and cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            ev = evaluate(
                model,
                s.val_shards,
                s.recipe.img_size,
                s.num_classes,
                device,
                d,
                cfg.eval_batch_size,
                cfg.workers,
                s.recipe.crop_pct,
            )
            result.update(ev)
            if ev["top1_avg"] > best:
                best = ev["top1_avg"]
                if d.main:
                    ckpt.save_atomic(
                        _state(
                            model, optimizer, scheduler, scaler, ema, epoch + 1, 0, global_step, best, cfg, model_meta
                        ),
                        best_path,
                    )
        metrics.write("epoch", **result)
        save(epoch + 1, 0)
        barrier(d)
    result["best_top1"] = best
    return result
