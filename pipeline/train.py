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

from . import checkpoint as ckpt
from .cache import check_run
from .config import checked, write_resolved
from .data import StreamSpec, epoch_batches
from .distributed import Dist, any_rank, barrier, init, shutdown
from .errors import ConfigError
from .evaluate import evaluate
from .interrupt import RunInterrupted, StopSignals
from .metrics import DebugTrace, MetricsLog
from .models import check_input_size, resolve_device
from .options import TrainConfig
from .progress import progress_bar
from .run_data import live_teacher, resolve_data, student_for
from .samplers import EpochPlan, rank_shards, steps_per_epoch
from .seeding import stable_seed
from .task import DistillationTask

log = logging.getLogger(__name__)


@dataclass
class Position:
    """Where a run is; saved in every checkpoint."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_top1: float = -1.0


class Trainer:
    """One training run, from its config to its final metrics."""

    def __init__(self, cfg: TrainConfig, device: torch.device, dist: Dist, stop: StopSignals | None = None):
        self.cfg, self.device, self.dist = cfg, device, dist
        self.stop = stop or StopSignals()
        if dist.is_main:
            ckpt.prepare_out(cfg)
        self.data = resolve_data(cfg)
        self.checkpointer = ckpt.Checkpointer(cfg.out, writer=dist.is_main)
        state = self.checkpointer.load_last() if cfg.resume else None
        if cfg.resume and state is None:
            log.warning("--resume: no checkpoint at %s, starting from scratch", self.checkpointer.last_path)
        if state:
            ckpt.check_resumable(cfg, state, dist.world, self.checkpointer.last_path)
        self.position = Position(epoch=int(state["epoch"]) if state else 0)
        self.cache_shards = self._check_cache()
        self._build()
        if state:
            self.load_state_dict(state)
        if dist.is_main:
            write_resolved(cfg, cfg.out)
        self.metrics = MetricsLog(f"{cfg.out}/metrics.jsonl", dist.is_main)
        self.trace = DebugTrace(dist.rank)

    def _check_cache(self) -> list[int] | None:
        """Refuse, before any work, a cache that does not match or lacks a view the run needs."""
        data, cfg = self.data, self.cfg
        if data.cache is None:
            return None
        views = {v for e in range(self.position.epoch, cfg.epochs) for v in data.plan(e).views}
        rows = check_run(data.cache, data.shards, data.recipe.to_dict(), data.seed, views)
        if cfg.epochs > data.num_views:
            log.warning(
                "training %d epochs on a cache of %d views: views repeat (a run of E epochs uses E views of "
                "each sample, whatever --repeats; here each view serves up to %d epochs)",
                cfg.epochs,
                data.num_views,
                -(-cfg.epochs // data.num_views),
            )
        return rows

    def _build(self) -> None:
        """Student, live teacher, optimizer, schedule, EMA and task, in an order that fixes every RNG draw."""
        cfg, data, dist = self.cfg, self.data, self.dist
        self.run_seed = data.seed if cfg.run_seed is None else cfg.run_seed
        torch.manual_seed(stable_seed("init", self.run_seed))  # same initial weights on every rank
        self.model, self.model_meta = student_for(cfg, data)
        check_input_size(self.model, data.recipe.img_size, f"--model {cfg.model}")
        self.model.to(self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        teacher = live_teacher(cfg, data, self.device) if cfg.live else None
        self.global_batch = cfg.batch_size * dist.world * cfg.accum_steps
        self.lr = cfg.lr * self.global_batch / 512.0  # DeiT's linear scaling rule
        self.optimizer = create_optimizer_v2(self.model.net, "adamw", lr=self.lr, weight_decay=cfg.weight_decay)
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
        torch.manual_seed(stable_seed("noise", self.run_seed, dist.rank))
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
        cfg, data = self.cfg, self.data
        steps = steps_per_epoch(data.shards, data.plan(epoch), data.seed, self.dist.world, cfg.batch_size)
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
            "model": self.model.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.module.net.state_dict() if self.ema is not None else None,
            **dataclasses.asdict(self.position),
            "rng": ckpt.rng_state(),
            "world": self.dist.world,
            "config": dataclasses.asdict(self.cfg),
            "model_meta": self.model_meta,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.module.net.load_state_dict(state["ema"])
        self.position = Position(**{f.name: state[f.name] for f in dataclasses.fields(Position)})
        self.scheduler.step_update(num_updates=self.position.global_step)
        if self.dist.rank == 0:
            ckpt.set_rng_state(state["rng"])
        else:  # the checkpoint holds rank 0's generator; other ranks draw fresh, distinct noise
            torch.manual_seed(stable_seed("noise", self.run_seed, self.dist.rank, self.position.global_step))
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
            if epoch + 1 < cfg.epochs and any_rank([self.stop.received is not None], self.dist, self.device)[0]:
                self._interrupted(epoch + 1, 0)
        return {**result, "best_top1": p.best_top1}

    def _interrupted(self, epoch: int, step: int) -> None:
        """Save the exact position (no gradients pending) and stop; ``--resume`` continues from it."""
        p = self.position
        p.epoch, p.step_in_epoch = epoch, step
        self.checkpointer.save(self.state_dict())
        self.metrics.write("interrupted", epoch=epoch, step=step, signal=self.stop.received)
        signum = self.stop.received or 2
        raise RunInterrupted(
            signum,
            f"stopped by signal {signum} at epoch {epoch} step {step}; {self.checkpointer.last_path} holds this "
            "position: add --resume to continue",
        )

    def _batches(self, plan: EpochPlan) -> Any:
        data, dist, cfg, epoch = self.data, self.dist, self.cfg, plan.epoch
        spec = StreamSpec(
            shards=data.shards,
            shard_ids=rank_shards(data.shards, epoch, data.seed, dist.rank, dist.world),
            cache_shards=self.cache_shards if cfg.cached else None,
            cache_url=data.cache.url if data.cache and cfg.cached else None,
            plan=plan,
            recipe=data.recipe,
            seed=data.seed,
            num_classes=data.num_classes,
            on_error=cfg.on_error,  # type: ignore[arg-type]
        )
        return epoch_batches(
            spec,
            cfg.batch_size,
            cfg.workers,
            cfg.shuffle_buffer,
            stable_seed("batches", self.run_seed, epoch, dist.rank),
            pin_memory=self.device.type == "cuda",
        )

    def train_one_epoch(self, epoch: int) -> dict[str, Any]:
        cfg, p = self.cfg, self.position
        plan, steps = self.data.plan(epoch), self.steps(epoch)
        batches = self._batches(plan)
        views = ",".join(map(str, plan.views))
        self.task.train()
        t0, seen, loss_sum, trained = time.perf_counter(), 0, 0.0, 0
        mode = cfg.progress if self.dist.is_main else "off"
        with progress_bar(f"epoch {epoch} (views {views})", total=steps, unit="step", mode=mode) as bar:
            try:
                for step in range(steps):
                    batch = self._next(batches)
                    # One collective per step: a rank out of data, or asked to stop. A stop waits for the end of an
                    # accumulation cycle, unless the loader is gone; then the cycle's unapplied steps are redone.
                    stopping = self.stop.received is not None and (step % cfg.accum_steps == 0 or batch is None)
                    out_of_data, stopping = any_rank([batch is None, stopping], self.dist, self.device)
                    if stopping:
                        self._interrupted(epoch, max(step - step % cfg.accum_steps, p.step_in_epoch))
                    if out_of_data:
                        log.warning("epoch %d: a rank ran out of data at step %d of %d", epoch, step, steps)
                        break
                    if step < p.step_in_epoch:  # resuming mid-epoch: the data position is replayed, not retrained
                        bar.advance()
                        continue
                    loss, base, distill = self.train_step(batch, step, steps)
                    seen, loss_sum, trained = seen + len(batch["keys"]), loss_sum + loss, trained + 1
                    rate = seen * self.dist.world / max(time.perf_counter() - t0, 1e-9)
                    self._log_step(bar, epoch, step, steps, loss, base, distill, rate)
            finally:
                batches.close()  # shuts the epoch's loader workers down now, also when the epoch fails
        p.epoch, p.step_in_epoch = epoch + 1, 0
        self.scheduler.step(epoch + 1)
        elapsed = time.perf_counter() - t0
        return {
            "epoch": epoch,
            "views": list(plan.views),
            "steps": trained,
            "train_loss": loss_sum / max(trained, 1),
            "img_per_s": round(seen * self.dist.world / max(elapsed, 1e-9), 2),
            "epoch_s": round(elapsed, 3),
        }

    def _next(self, batches: Any) -> dict[str, Any] | None:
        """The next batch; a loader that fails after a stop signal (a batch system's SIGTERM reaches the
        workers too) means: stop here."""
        try:
            return next(batches, None)
        except Exception:
            if self.stop.received is None:
                raise
            log.warning("the data loader stopped after signal %d; stopping at this step", self.stop.received)
            return None

    def _log_step(
        self, bar: Any, epoch: int, step: int, steps: int, loss: float, base: float, distill: float, rate: float
    ) -> None:
        """Progress display, metrics line every ``log_every`` steps, and the mid-epoch checkpoint."""
        cfg, p = self.cfg, self.position
        lr = self.optimizer.param_groups[0]["lr"]
        bar.advance()
        bar.set(loss=loss, lr=lr, img_s=rate)
        if cfg.log_every and (step + 1) % cfg.log_every == 0:
            fields = {"loss": loss, "base_loss": base, "distill_loss": distill, "lr": lr}
            self.metrics.write("train", epoch=epoch, step=step + 1, **fields, img_per_s=round(rate, 2))
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
            p.epoch, p.step_in_epoch = epoch, step + 1
            self.checkpointer.save(self.state_dict())

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
        """Save ``last.pth``, then evaluate when due and keep ``best.pth`` on a new best.

        The epoch is saved before the evaluation runs, so a failed evaluation never loses it.
        """
        cfg, data, p = self.cfg, self.data, self.position
        result: dict[str, Any] = {}
        self.checkpointer.save(self.state_dict())
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
                self.checkpointer.save(self.state_dict())  # last.pth records the new best too
        return result


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a training job. Returns the final metrics.

    Raises:
        RunInterrupted: on SIGINT/SIGTERM, after saving the exact position to ``last.pth``.
    """
    cfg = checked(cfg)
    device = resolve_device(cfg.device)
    with StopSignals() as stop:
        dist = init(device.type)
        try:
            if cfg.deterministic:
                torch.use_deterministic_algorithms(True)
            return Trainer(cfg, device, dist, stop).train()
        finally:
            shutdown(dist)
