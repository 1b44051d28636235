"""Phase 2: train a student (or a teacher, with ``distillation: none``) from replayed views.

A :class:`Trainer` is built once (data, cache, model, optimizer, schedule, EMA, task), restored once
from ``OUT/last.pth`` when resuming, then runs ``train_one_epoch`` and ``evaluate_and_save`` per
epoch. The :class:`~pipeline.task.DistillationTask` owns forward and loss, so the loop knows nothing
about teachers or caches. Every stateful part saves and loads through one checkpoint dict
(:meth:`Trainer.state_dict`); DDP is applied after the model is built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn

from . import checkpoint as ckpt
from .cache import Cache, open_cache
from .config import finish
from .data import StreamSpec, epoch_batches, rank_shards, steps_per_epoch, view_for_epoch
from .distributed import Dist, all_min, barrier, init, shutdown
from .errors import ConfigError
from .evaluate import evaluate
from .metrics import DebugTrace, MetricsLog
from .models import Normalized, create, load_teacher, model_stats, resolve_device
from .options import TrainConfig
from .progress import progress_bar
from .recipe import Recipe, make_recipe
from .seeding import stable_seed
from .shards import ShardInfo, load_shard_list, num_classes_from_sidecar
from .task import DistillationTask

log = logging.getLogger(__name__)


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

    @property
    def num_views(self) -> int:
        """Views available per sample: the cache's, or unbounded when views are replayed without one."""
        return self.cache.meta.views if self.cache else 1 << 30


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
    else:
        recipe = make_recipe(cfg.recipe or "deit", cfg.img_size)
        seed = cfg.seed or 0
        num_classes = cfg.num_classes or num_classes_from_sidecar(shards[0].url) or 0
        topk, temperatures = cfg.topk, list(cfg.temperatures)
    if not num_classes:
        raise ConfigError("number of classes unknown: pass --num-classes (no cache, no pack sidecar)")
    return RunData(shards, val_shards, recipe, seed, num_classes, cache, topk, temperatures)


@dataclass
class Position:
    """Where a run is; saved in every checkpoint."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_top1: float = -1.0


class Trainer:
    """One training run, from its config to its final metrics."""

    def __init__(self, cfg: TrainConfig, device: torch.device, dist: Dist):
        self.cfg, self.device, self.dist = cfg, device, dist
        self.data = resolve_data(cfg)
        self.checkpointer = ckpt.Checkpointer(cfg.out, writer=dist.main)
        state = self.checkpointer.load_last() if cfg.resume else None
        if cfg.resume and state is None:
            log.warning("--resume: no checkpoint at %s, starting from scratch", self.checkpointer.last_path)
        self.position = Position(epoch=int(state["epoch"]) if state else 0)
        self.cache_rows = self._check_cache()
        self._build()
        if state:
            self.load_state_dict(state)
        self.metrics = MetricsLog(f"{cfg.out}/metrics.jsonl", dist.main)
        self.trace = DebugTrace(dist.rank)

    def _check_cache(self) -> list[int] | None:
        """Refuse, before any work, a cache that does not match or lacks a view the run needs."""
        data, cfg = self.data, self.cfg
        if data.cache is None:
            return None
        views = {view_for_epoch(e, data.num_views) for e in range(self.position.epoch, cfg.epochs)}
        rows = data.cache.check_run(data.shards, data.recipe.to_dict(), data.seed, views)
        if cfg.epochs > data.num_views:
            log.warning(
                "training %d epochs on a cache of %d views: views repeat (epoch e uses view e mod %d)",
                cfg.epochs,
                data.num_views,
                data.num_views,
            )
        return rows

    def _build(self) -> None:
        """Student, live teacher, optimizer, schedule, EMA and task, in an order that fixes every RNG draw."""
        cfg, data, dist = self.cfg, self.data, self.dist
        torch.manual_seed(stable_seed("init", data.seed))  # same initial weights on every rank
        self.model, self.model_meta = build_student(cfg, data)
        self.model.to(self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        teacher = build_live_teacher(cfg, data, self.device) if cfg.live else None
        self.global_batch = cfg.batch_size * dist.world * cfg.accum_steps
        self.lr = cfg.lr * self.global_batch / 512.0  # DeiT's linear scaling rule
        self.optimizer = create_optimizer_v2(self.model.model, "adamw", lr=self.lr, weight_decay=cfg.weight_decay)
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer,
            "cosine",
            num_epochs=cfg.epochs,
            warmup_epochs=cfg.warmup_epochs,
            warmup_lr=cfg.warmup_lr,
            min_lr=cfg.min_lr,
            step_on_epochs=False,
            updates_per_epoch=max(self.steps(0) // cfg.accum_steps, 1),
        )
        self.ema = ModelEmaV3(self.model, decay=cfg.model_ema_decay) if cfg.model_ema else None
        # Drop path draws from the global generator: seed it once everything is built, so building a
        # live teacher (which consumes global draws for its init) cannot change the student's noise.
        torch.manual_seed(stable_seed("noise", data.seed, dist.rank))
        self.task = DistillationTask(
            student=self.model,
            num_classes=data.num_classes,
            distillation=cfg.distillation,  # type: ignore[arg-type]
            alpha=cfg.alpha,
            tau=cfg.tau,
            temperatures=data.temperatures,
            smoothing=data.recipe.smoothing,
            teacher=teacher,
            topk=data.topk,
            amp=cfg.amp,
        )
        if dist.enabled:
            self.task.prepare_distributed(self.device)

    def steps(self, epoch: int) -> int:
        """Steps of ``epoch``: the same on every rank (computed from shard counts alone)."""
        cfg = self.cfg
        steps = steps_per_epoch(self.data.shards, epoch, self.data.seed, self.dist.world, cfg.batch_size)
        if cfg.max_steps_per_epoch:
            steps = min(steps, cfg.max_steps_per_epoch)
        if steps < 1:
            raise ConfigError(f"--batch-size {cfg.batch_size} x {self.dist.world} ranks is larger than a rank's data")
        return steps

    # -- checkpoint ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Every stateful part of the run; what ``last.pth`` and ``best.pth`` hold.

        The learning-rate schedule is not stored: it is rebuilt from this run's config (e.g. a larger
        ``--epochs``) and fast-forwarded to ``global_step``.
        """
        return {
            "model": self.model.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.module.model.state_dict() if self.ema is not None else None,
            **dataclasses.asdict(self.position),
            "rng": ckpt.rng_state(),
            "config": dataclasses.asdict(self.cfg),
            "model_meta": self.model_meta,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.module.model.load_state_dict(state["ema"])
        self.position = Position(**{f.name: state[f.name] for f in dataclasses.fields(Position)})
        self.scheduler.step_update(num_updates=self.position.global_step)
        if self.dist.rank == 0:
            ckpt.set_rng_state(state["rng"])
        else:  # the checkpoint holds rank 0's generator; other ranks draw fresh, distinct noise
            torch.manual_seed(stable_seed("noise", self.data.seed, self.dist.rank, self.position.global_step))
        log.info(
            "resumed from %s: epoch %d, step %d",
            self.checkpointer.last_path,
            self.position.epoch,
            self.position.step_in_epoch,
        )

    # -- the loop --------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run the remaining epochs; returns the last epoch's metrics and the best top-1."""
        cfg, p = self.cfg, self.position
        self.metrics.write(
            "start",
            world=self.dist.world,
            global_batch=self.global_batch,
            lr=self.lr,
            num_classes=self.data.num_classes,
            distillation=cfg.distillation,
            teacher_mode=cfg.teacher_mode,
            first_epoch=p.epoch,
            start_step=p.step_in_epoch,
        )
        result: dict[str, Any] = {}
        for epoch in range(p.epoch, cfg.epochs):
            result = self.train_one_epoch(epoch)
            result.update(self.evaluate_and_save(epoch))
            self.metrics.write("epoch", **result)
            barrier(self.dist)
        return {**result, "best_top1": p.best_top1}

    def _batches(self, epoch: int, view: int) -> Any:
        data, dist, cfg = self.data, self.dist, self.cfg
        spec = StreamSpec(
            shards=data.shards,
            shard_ids=rank_shards(data.shards, epoch, data.seed, dist.rank, dist.world),
            cache_rows=self.cache_rows if cfg.cached else None,
            cache_url=data.cache.url if data.cache and cfg.cached else None,
            view=view,
            recipe=data.recipe,
            seed=data.seed,
            num_classes=data.num_classes,
            on_error=cfg.on_error,  # type: ignore[arg-type]
        )
        return epoch_batches(
            spec,
            cfg.batch_size,
            cfg.workers,
            cfg.shuffle_buffer or 2 * cfg.batch_size,
            stable_seed("batches", data.seed, epoch, dist.rank),
            pin_memory=self.device.type == "cuda",
        )

    def train_one_epoch(self, epoch: int) -> dict[str, Any]:
        cfg, p = self.cfg, self.position
        view, steps = view_for_epoch(epoch, self.data.num_views), self.steps(epoch)
        batches = self._batches(epoch, view)
        self.task.train()
        t0, seen, loss_sum, trained = time.perf_counter(), 0, 0.0, 0
        mode = cfg.progress if self.dist.main else "off"
        with progress_bar(f"epoch {epoch} (view {view})", total=steps, unit="step", mode=mode) as bar:
            for step in range(steps):
                batch = next(batches, None)
                if all_min(int(batch is not None), self.dist, self.device) == 0:
                    log.warning("epoch %d: a rank ran out of data at step %d of %d", epoch, step, steps)
                    break
                if step < p.step_in_epoch:  # resuming mid-epoch: the data position is replayed, not retrained
                    bar.advance()
                    continue
                loss, base, distill = self.train_step(batch, step, steps)
                seen, loss_sum, trained = seen + len(batch["keys"]), loss_sum + loss, trained + 1
                rate = seen * self.dist.world / max(time.perf_counter() - t0, 1e-9)
                lr = self.optimizer.param_groups[0]["lr"]
                bar.advance()
                bar.set(loss=loss, lr=lr, img_s=rate)
                if cfg.log_every and (step + 1) % cfg.log_every == 0:
                    fields = {"loss": loss, "base_loss": base, "distill_loss": distill, "lr": lr}
                    self.metrics.write("train", epoch=epoch, step=step + 1, **fields, img_per_s=round(rate, 2))
                if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
                    p.epoch, p.step_in_epoch = epoch, step + 1
                    self.checkpointer.save(self.state_dict())
        p.epoch, p.step_in_epoch = epoch + 1, 0
        self.scheduler.step(epoch + 1)
        elapsed = time.perf_counter() - t0
        return {
            "epoch": epoch,
            "view": view,
            "steps": trained,
            "train_loss": loss_sum / max(trained, 1),
            "img_per_s": round(seen * self.dist.world / max(elapsed, 1e-9), 2),
            "epoch_s": round(elapsed, 3),
        }

    def train_step(self, batch: dict[str, Any], step: int, steps: int) -> tuple[float, float, float]:
        """Forward, backward and (at the end of an accumulation) an optimizer step.

        Returns:
            The loss and its two terms, read back to the host once.
        """
        cfg, p = self.cfg, self.position
        batch = {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
        micro = (step + 1) % cfg.accum_steps != 0 and step + 1 != steps
        with self.task.no_sync() if micro else contextlib.nullcontext():
            out = self.task(batch)
            (out.loss / cfg.accum_steps).backward()
        if not micro:
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            p.global_step += 1
            self.scheduler.step_update(num_updates=p.global_step)
            if self.ema is not None:
                self.ema.update(self.model, step=p.global_step)
        loss, base, distill = torch.stack([out.loss.detach(), out.base_loss, out.distill_loss]).tolist()
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step} of epoch {p.epoch}")
        self.trace.record(
            self.model, epoch=p.epoch, step=step, global_step=p.global_step, keys=batch["keys"], loss=loss
        )
        return loss, base, distill

    def evaluate_and_save(self, epoch: int) -> dict[str, Any]:
        """Evaluate when due, keep ``best.pth`` on a new best, then save ``last.pth``."""
        cfg, data, p = self.cfg, self.data, self.position
        result: dict[str, Any] = {}
        due = cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs)
        if data.val_shards and due:
            result = evaluate(
                self.model,
                data.val_shards,
                data.recipe.img_size,
                data.num_classes,
                self.device,
                self.dist,
                cfg.eval_batch_size,
                cfg.workers,
                data.recipe.crop_pct,
                cfg.on_error,  # type: ignore[arg-type]
            )
            if result["top1_avg"] > p.best_top1:
                p.best_top1 = result["top1_avg"]
                self.checkpointer.save(self.state_dict(), best=True)
        self.checkpointer.save(self.state_dict())
        return result


def build_student(cfg: TrainConfig, data: RunData) -> tuple[nn.Module, dict[str, Any]]:
    """The student wrapped with its normalisation, and the metadata ``evaluate`` rebuilds it from."""
    kwargs = dict(cfg.model_kwargs)
    if cfg.drop_path:
        kwargs.setdefault("drop_path_rate", cfg.drop_path)
    model = create(cfg.model, data.num_classes, **kwargs)
    if hasattr(model, "set_distilled_training"):
        # Both heads' logits in training; with --distillation none the distillation head gets no loss (DeiT).
        model.set_distilled_training(True)
    elif cfg.distillation != "none":
        log.warning("%s has no distillation head: the distillation loss trains its only head", cfg.model)
    mean, std = model_stats(model)
    meta = {
        "name": cfg.model,
        "kwargs": {k: v for k, v in kwargs.items() if k != "drop_path_rate"},
        "crop_pct": data.recipe.crop_pct,
        "num_classes": data.num_classes,
        "img_size": data.recipe.img_size,
        "mean": list(mean),
        "std": list(std),
    }
    return Normalized(model, mean, std), meta


def build_live_teacher(cfg: TrainConfig, data: RunData, device: torch.device) -> nn.Module:
    name = cfg.teacher or (data.cache.meta.teacher["name"] if data.cache else None)
    if not name:
        raise ConfigError("--teacher-mode live needs --teacher NAME (there is no cache to take it from)")
    return load_teacher(name, data.num_classes, cfg.teacher_checkpoint, device, cfg.teacher_kwargs)[0]


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a training job. Returns the final metrics."""
    cfg = finish(cfg)
    device = resolve_device(cfg.device)
    dist = init(device.type)
    try:
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        return Trainer(cfg, device, dist).train()
    finally:
        shutdown(dist)
