"""The distillation task: owns the student's forward pass and the loss, so the training loop knows
nothing about teachers, caches or heads (the shape of timm's ``task/`` modules).

Teacher targets arrive in the batch (``t_values``, ``t_indices``, ``t_lse``) in cached mode, or
are computed here by a live teacher on the very same pixels, through the same top-k reduction,
so the two modes differ only by the cache's fp16 rounding of the top-k logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from . import losses
from .models import autocast, topk_targets

Distillation = Literal["none", "hard", "soft"]


@dataclass
class TaskOutput:
    loss: torch.Tensor
    base_loss: float
    distill_loss: float


class DistillationTask(nn.Module):
    """Student forward + DeiT loss: ``(1 - alpha) * CE(cls head, mixed labels) + alpha * distill``.

    Args:
        student: Model taking replayed pixels; returns ``(cls, dist)`` logits for a distilled model in
            training mode, or one tensor.
        num_classes: Number of classes.
        distillation: ``none``, ``hard`` (teacher argmax) or ``soft`` (KL at ``tau``).
        alpha: Weight of the distillation term.
        tau: Temperature of soft distillation; must be one of ``temperatures``.
        temperatures: The temperatures whose logsumexp is in the batch (the cache's order).
        smoothing: Label smoothing of the ground-truth term.
        teacher: A live teacher (frozen, normalising its own input) or ``None`` in cached mode.
        topk: K used when reducing live teacher logits (the cache's K, for a like-for-like check).
        amp: bf16 autocast of the student on CUDA (no effect on CPU).
    """

    def __init__(
        self,
        student: nn.Module,
        num_classes: int,
        distillation: Distillation = "hard",
        alpha: float = 0.5,
        tau: float = 1.0,
        temperatures: list[float] | None = None,
        smoothing: float = 0.1,
        teacher: nn.Module | None = None,
        topk: int = 10,
        amp: bool = True,
    ):
        super().__init__()
        if distillation not in ("none", "hard", "soft"):
            raise ValueError(f"--distillation {distillation!r}: expected none, hard or soft")
        temperatures = list(temperatures or [tau])
        if distillation == "soft" and float(tau) not in [float(t) for t in temperatures]:
            raise ValueError(f"--tau {tau} is not a cached temperature (cache has {temperatures})")
        self.student = student
        self.teacher = teacher
        self.num_classes, self.distillation = num_classes, distillation
        self.alpha, self.tau, self.temperatures = float(alpha), float(tau), temperatures
        self.smoothing, self.topk, self.amp = smoothing, topk, amp

    def teacher_targets(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(values, indices, lse)`` from the batch (cached) or from the live teacher."""
        if self.teacher is None:
            return batch["t_values"], batch["t_indices"], batch["t_lse"]
        with torch.inference_mode(), autocast(batch["pixels"].device):
            logits = self.teacher(batch["pixels"])
        values, indices, lse = topk_targets(logits, self.topk, self.temperatures, half=False)
        return values.clone(), indices.clone(), lse.clone()

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> TaskOutput:
        target = losses.mixed_targets(
            batch["label"], batch["mix_label"], batch["lam"], self.num_classes, self.smoothing
        )
        if self.distillation == "none":
            logits = outputs if isinstance(outputs, torch.Tensor) else (outputs[0] + outputs[1]) / 2
            base = losses.soft_cross_entropy(logits, target)
            return TaskOutput(base, float(base.detach()), 0.0)
        cls_logits, dist_logits = outputs if isinstance(outputs, tuple | list) else (outputs, outputs)
        base = losses.soft_cross_entropy(cls_logits, target)
        values, indices, lse = self.teacher_targets(batch)
        if self.distillation == "hard":
            distill = losses.hard_distillation(dist_logits, indices[:, 0])
        else:
            t = self.temperatures.index(self.tau)
            probs = losses.soft_target_probs(values, indices, lse[:, t], self.tau, self.num_classes)
            distill = losses.soft_distillation(dist_logits, probs, self.tau)
        return TaskOutput(losses.combine(base, distill, self.alpha), float(base.detach()), float(distill.detach()))

    def forward(self, batch: dict[str, torch.Tensor]) -> TaskOutput:
        with autocast(batch["pixels"].device, self.amp):
            outputs = self.student(batch["pixels"])
        return self.loss(outputs, batch)
