"""Phase 2: train a student (or a teacher, with ``distillation: none``) from replayed views.

A :class:`Trainer` is built once (data, caches, model, optimizer, schedule, EMA, task), restored once
from ``OUT/last.pth`` when resuming, then runs ``train_one_epoch`` and ``evaluate_and_save`` per epoch.
The :class:`~pipeline.models.task.DistillationTask` owns forward and loss, so the loop knows nothing about
teachers or caches; :class:`~pipeline.phase2.epoch.RankEpoch` owns what a rank trains in an epoch. Every
stateful part saves and loads through one checkpoint dict (:meth:`Trainer.state_dict`); DDP is applied
after the model is built. Random noise (drop path) is seeded per step from the run seed, rank and
position, so a resumed run draws what the uninterrupted one drew, on every rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.config import checked, write_resolved
from pipeline.errors import TrainingError, WorkerError
from pipeline.interrupt import RunInterrupted, StopSignals
from pipeline.models.build import check_input_size, resolve_device
from pipeline.models.task import DistillationTask
from pipeline.phase2 import checkpoint as ckpt
from pipeline.phase2.distributed import Dist, any_rank, barrier, init, shutdown
from pipeline.phase2.epoch import RankEpoch, next_batch, noise_seed
from pipeline.phase2.evaluate import evaluate
from pipeline.phase2.identity import check_resumable, run_identity
from pipeline.phase2.inputs import RunData, check_caches, resolve_data
from pipeline.phase2.metrics import DebugTrace, MetricsLog, StepMeter
from pipeline.phase2.optimization import Optimization
from pipeline.phase2.run_models import live_teachers, student_for
from pipeline.progress import progress_bar
from pipeline.seeding import stable_seed
from pipeline.train_options import TrainConfig

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
        self.identity = run_identity(cfg, self.data)
        self.checkpointer = ckpt.Checkpointer(cfg.out, writer=dist.is_main)
        state = self.checkpointer.load_last() if cfg.resume else None
        last = self.checkpointer.last_path  # changes --allow-change let through: on this resume, then on all
        self.changes = check_resumable(cfg, state, dist.world, last, self.identity) if state else []
        self.history = [*(state or {}).get("changes", []), *self.changes]
        self.position = Position(epoch=int(state["epoch"]) if state else 0)
        # Skips and fills of this epoch's steps before a mid-epoch checkpoint: resumed, and to be saved.
        self.carried, self.partial = dict(state.get("epoch_account") or {}) if state else {}, {}
        self.part: RankEpoch | None = None
        soft = float(cfg.tau) if cfg.distillation == "soft" else None
        self.cache_shards = check_caches(self.data, self.position.epoch, cfg.epochs, soft)
        self._build()
        if state:
            self.load_state_dict(state)
        if dist.is_main:  # nothing in OUT is moved or written before every refusal above
            ckpt.move_previous_aside(cfg)
            write_resolved(cfg, cfg.out)
        self.metrics = MetricsLog(f"{cfg.out}/metrics.jsonl", dist.is_main, cfg.log_to, dataclasses.asdict(cfg))
        self.trace = DebugTrace(dist.rank)

    def _build(self) -> None:
        """Student, live teachers, optimizer, schedule, EMA and task, in an order that fixes every RNG draw."""
        cfg, data, dist = self.cfg, self.data, self.dist
        self.run_seed = data.seed if cfg.run_seed is None else cfg.run_seed
        torch.manual_seed(stable_seed("init", self.run_seed))  # same initial weights on every rank
        self.model, self.model_meta = student_for(cfg, data)
        check_input_size(self.model, data.recipe.img_size, f"--model {cfg.model}")
        self.model.to(self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        teachers = live_teachers(cfg, data, self.device) if cfg.live else []
        self.global_batch = cfg.batch_size * dist.world * cfg.accum_steps
        self.opt = Optimization(cfg, self.model, self.global_batch, self.rank_epoch(0).steps // cfg.accum_steps)
        self.task = make_task(cfg, data, self.model, teachers)
        if dist.enabled:
            self.task.prepare_distributed(self.device)
        if cfg.compile:
            self.task.student = torch.compile(self.task.student)

    def rank_epoch(self, epoch: int) -> RankEpoch:
        return RankEpoch(self.data, self.cfg, self.dist, epoch, self.run_seed, self.cache_shards)

    # -- checkpoint ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Every stateful part of the run; what ``last.pth`` and ``best.pth`` hold.

        The learning-rate schedule is not stored: it is rebuilt from this run's options (a longer ``--epochs``
        stretches the cosine from ``global_step`` on). No RNG state: noise is seeded per step. ``changes``: every
        ``--allow-change`` so far."""
        return {
            "model": self.model.net.state_dict(),
            **self.opt.state_dict(),
            **dataclasses.asdict(self.position),
            "world": self.dist.world,
            "config": dataclasses.asdict(self.cfg),
            "identity": self.identity,
            "changes": self.history,
            "model_meta": self.model_meta,
            "epoch_account": dict(self.partial),  # skips and fills of this epoch's steps before the position
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.net.load_state_dict(state["model"])
        self.position = Position(**{f.name: state[f.name] for f in dataclasses.fields(Position)})
        self.opt.load_state_dict(state, self.position.global_step)
        p = self.position
        log.info("resumed from %s: epoch %d, step %d", self.checkpointer.last_path, p.epoch, p.step_in_epoch)

    # -- the loop --------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run the remaining epochs; returns the last epoch's metrics and the best top-1."""
        cfg, p = self.cfg, self.position
        self.metrics.write(
            "start",
            world=self.dist.world,
            global_batch=self.global_batch,
            lr=self.opt.lr,
            num_classes=self.data.num_classes,
            distillation=cfg.distillation,
            teacher_mode=cfg.teacher_mode,
            teachers=len(self.data.weights),
            first_epoch=p.epoch,
            start_step=p.step_in_epoch,
        )
        for change in self.changes:
            self.metrics.write("changed", **change)
        result: dict[str, Any] = {}
        for epoch in range(p.epoch, cfg.epochs):
            result = self.train_one_epoch(epoch)
            result.update(self.evaluate_and_save(epoch))
            self.metrics.write("epoch", **result)
            barrier(self.dist)
            if epoch + 1 < cfg.epochs and any_rank([self.stop.received is not None], self.dist, self.device)[0]:
                self._interrupted(epoch + 1, 0)
        return {**result, "best_top1": p.best_top1}

    def _save_at(self, epoch: int, step: int) -> None:
        """Save ``last.pth`` at a position: the end of an epoch (``step`` 0), or a step inside it with the
        account of the steps before it, so that a resumed epoch reports all of its copies (every rank)."""
        p = self.position
        p.epoch, p.step_in_epoch = epoch, step
        self.partial = self.part.skips(self.device, self.carried, until=step) if step and self.part else {}
        self.checkpointer.save(self.state_dict())

    def _interrupted(self, epoch: int, step: int, failure: WorkerError | None = None, saved: bool = False) -> None:
        """Save the exact position (no gradients pending) unless ``saved``, and stop; ``--resume`` continues from
        it. A stop signal ends with :class:`RunInterrupted`, a dead loader worker with ``failure``, completed."""
        if not saved:
            self._save_at(epoch, step)
        why = {"reason": str(failure)} if failure and self.stop.received is None else {"signal": self.stop.received}
        self.metrics.write("interrupted", epoch=epoch, step=step, **why)
        at = f"at epoch {epoch} step {step}, saved in {self.checkpointer.last_path}: add --resume to continue"
        if "reason" in why:
            raise WorkerError(f"{failure}; stopped {at}")
        raise RunInterrupted(self.stop.received or 2, f"stopped by signal {self.stop.received or 2} {at}")

    def train_one_epoch(self, epoch: int) -> dict[str, Any]:
        cfg, p = self.cfg, self.position
        part = self.part = self.rank_epoch(epoch)
        steps, first = part.steps, p.step_in_epoch
        batches = iter(part.stream(first, self.task.target_tau, pin_memory=self.device.type == "cuda"))
        self.task.train()
        mode = cfg.progress if self.dist.is_main else "off"
        views = ",".join(map(str, part.plan.views))
        bar_ctx = progress_bar(f"epoch {epoch} (views {views})", total=steps - first, unit="step", mode=mode)
        with bar_ctx as bar, contextlib.closing(batches):  # type: ignore[type-var]
            meter = StepMeter(self.metrics, bar, cfg.log_every, self.dist.world)
            for step in range(first, steps):
                batch, failure = next_batch(batches, self.stop)
                # One collective per step: a rank asked to stop. A stop waits for the end of an accumulation
                # cycle, unless the loader is gone; then the cycle's unapplied steps are redone.
                if p.global_step == self.trace.stop_at:  # tests: a stop signal at an exact step, on every rank
                    self.stop.received = signal.SIGTERM
                stopping = self.stop.received is not None and (step % cfg.accum_steps == 0 or batch is None)
                if any_rank([stopping or failure is not None], self.dist, self.device)[0]:
                    self._interrupted(epoch, max(step - step % cfg.accum_steps, first), failure)
                meter.step(
                    epoch, step, self.train_step(batch, epoch, step, steps), len(batch["keys"]), self.opt.current_lr
                )
                if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
                    self._save_at(epoch, step + 1)
        copies = part.account(self.device, self.carried)
        p.epoch, p.step_in_epoch = epoch + 1, 0
        self.carried, self.partial = {}, {}
        self.opt.end_epoch(epoch + 1)
        return {"epoch": epoch, "views": list(part.plan.views), **meter.summary(), "copies": copies}

    def train_step(self, batch: dict[str, Any], epoch: int, step: int, steps: int) -> tuple[float, float, float]:
        """Forward, backward and (at the end of an accumulation) an optimizer step.

        Returns:
            The loss and its two terms, read back to the host once.
        """
        cfg, p = self.cfg, self.position
        torch.manual_seed(noise_seed(self.run_seed, self.dist.rank, epoch, step))
        batch = {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
        micro = (step + 1) % cfg.accum_steps != 0 and step + 1 != steps
        with self.task.no_sync() if micro else contextlib.nullcontext():
            out = self.task(batch)
            (out.loss / cfg.accum_steps).backward()
        if not micro:
            p.global_step += 1
            self.opt.step(p.global_step)
        loss, base, distill = torch.stack([out.loss.detach(), out.base_loss, out.distill_loss]).tolist()
        if not math.isfinite(loss):
            raise diverged(loss, epoch, step, self.opt.current_lr, cfg)
        self.trace.record(self.model, epoch=epoch, step=step, global_step=p.global_step, keys=batch["keys"], loss=loss)
        return loss, base, distill

    def evaluate_and_save(self, epoch: int) -> dict[str, Any]:
        """Save ``last.pth``, then evaluate when due and keep ``best.pth`` on a new best.

        The epoch is saved before the evaluation runs, so a failed evaluation never loses it.
        """
        cfg, data, p = self.cfg, self.data, self.position
        self.checkpointer.save(self.state_dict())
        due = cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs)
        if not (data.val_shards and due):
            return {}
        try:
            result = validate(self.model, data, cfg, self.device, self.dist)
        except Exception as e:  # a stop signal or a dead worker while evaluating: the epoch is saved already
            if self.stop.received is None and not isinstance(e, WorkerError):
                raise
            self._interrupted(epoch + 1, 0, e if isinstance(e, WorkerError) else None, saved=True)
        if result["top1_avg"] > p.best_top1:
            p.best_top1 = result["top1_avg"]
            self.checkpointer.save(self.state_dict(), best=True)
            self.checkpointer.save(self.state_dict())  # last.pth records the new best too
        return result


def make_task(
    cfg: TrainConfig, data: RunData, model: torch.nn.Module, teachers: list[torch.nn.Module]
) -> DistillationTask:
    """The task that owns the run's forward and loss (DeiT's, with its options and the caches' reductions)."""
    return DistillationTask(
        student=model,
        num_classes=data.num_classes,
        distillation=cfg.distillation,  # type: ignore[arg-type]
        alpha=cfg.alpha,
        tau=cfg.tau,
        weights=data.weights,
        teachers=teachers,
        reductions=data.reductions,
        smoothing=data.recipe.smoothing,
        amp=cfg.amp,
    )


def validate(model: torch.nn.Module, data: RunData, cfg: TrainConfig, device: torch.device, dist: Dist) -> dict:
    """Top-1/top-5 of each head on the validation shards (every rank takes its share)."""
    return evaluate(
        model,
        data.val_shards,
        data.recipe.img_size,
        data.num_classes,
        device,
        dist,
        cfg.eval_batch_size,
        cfg.workers,
        data.recipe.crop_pct,
        cfg.on_error,  # type: ignore[arg-type]
    )


def diverged(loss: float, epoch: int, step: int, lr: float, cfg: TrainConfig) -> TrainingError:
    """The one line of a run whose loss is no longer finite (a learning rate too large for it)."""
    return TrainingError(
        f"the loss is {loss} at step {step} of epoch {epoch} (learning rate {lr:.3g}, from --lr {cfg.lr:g}): the "
        "run diverged. Lower --lr (or set --clip-grad) and start again (--force-new over this --out)"
    )


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
