"""AdamW, the cosine learning-rate schedule and the weights' moving average: DeiT's optimisation, stepped
once per accumulation cycle, saved and restored through the run's one checkpoint dict."""

from __future__ import annotations

from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

from pipeline.models.build import Normalized
from pipeline.train_options import TrainConfig


class Optimization:
    """The optimiser, schedule and EMA of one run.

    Args:
        cfg: The run's options (lr for a global batch of 512, scaled linearly as DeiT does).
        model: The student (wrapped with its normalisation).
        global_batch: Batch size x ranks x accumulation.
        updates_per_epoch: Optimizer steps of an epoch (the schedule's warmup and cosine count them).
    """

    def __init__(self, cfg: TrainConfig, model: Normalized, global_batch: int, updates_per_epoch: int):
        self.model, self.clip = model, cfg.clip_grad
        self.lr = cfg.lr * global_batch / 512.0  # DeiT's linear scaling rule
        self.optimizer = create_optimizer_v2(model.net, "adamw", lr=self.lr, weight_decay=cfg.weight_decay)
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer,
            "cosine",
            num_epochs=cfg.epochs,
            warmup_epochs=cfg.warmup_epochs,
            warmup_lr=cfg.warmup_lr,
            min_lr=cfg.min_lr,
            step_on_epochs=False,
            updates_per_epoch=max(updates_per_epoch, 1),
        )
        self.ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None

    @property
    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self, global_step: int) -> None:
        """One optimizer step (the gradients of a whole accumulation cycle), then the schedule and EMA."""
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step_update(num_updates=global_step)
        if self.ema is not None:
            self.ema.update(self.model, step=global_step)

    def end_epoch(self, epoch: int) -> None:
        self.scheduler.step(epoch)

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state and the EMA weights (the schedule is rebuilt from the config)."""
        ema = self.ema.module.net.state_dict() if self.ema is not None else None
        return {"optimizer": self.optimizer.state_dict(), "ema": ema}

    def load_state_dict(self, state: dict[str, Any], global_step: int) -> None:
        """Restore the optimizer's moments and the EMA; the model's weights must be loaded first.

        The options stay this run's: torch's ``load_state_dict`` would bring back the checkpoint's weight decay
        (and lr) with the moments, silently undoing a change ``--allow-change`` let through. An EMA turned on at
        this resume starts from the resumed weights, not from the run's initial ones.
        """
        options = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, values in zip(self.optimizer.param_groups, options, strict=True):
            group.update(values)
        if self.ema is not None:
            ema = state.get("ema")
            self.ema.module.net.load_state_dict(ema if ema is not None else self.model.net.state_dict())
        self.scheduler.step_update(num_updates=global_step)
