"""The distillation task: owns the student's forward pass and the loss, so the training loop knows
nothing about teachers, caches or heads (the shape of timm's ``task/`` modules).

Teacher targets arrive in the batch (``t_values``, ``t_indices``, ``t_lse``) in cached mode, or
are computed here by a live teacher on the very same pixels, through the same top-k reduction,
so the two modes differ only by the cache's fp16 rounding of the top-k logits.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import losses
from .models import autocast
from .targets import soft_target_probs, topk_targets

Distillation = Literal["none", "hard", "soft"]


@dataclass
class TaskOutput:
    """The loss to backpropagate and its two terms (detached), all on the device: reading them
    back to the host is the caller's choice, once per step."""

    loss: torch.Tensor
    base_loss: torch.Tensor
    distill_loss: torch.Tensor


class DistillationTask(nn.Module):
    """Student forward + DeiT loss: ``(1 - alpha) * CE(cls head, mixed labels) + alpha * distill``.

    Args:
        student: Model taking replayed pixels; returns ``(cls, dist)`` logits for a distilled model in
            training mode, or one tensor.
        num_classes: Number of classes.
        distillation: ``hard`` (teacher argmax), ``soft`` (KL at ``tau``) or ``none``: the class head
            learns the labels and the distillation head gets no loss, as in DeiT (a model without a
            distillation head trains its only head on the labels).
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
        *,
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
        self.student = student
        self.teacher = teacher
        self.num_classes, self.distillation = num_classes, distillation
        self.alpha, self.tau = float(alpha), float(tau)
        self.temperatures = [float(t) for t in (temperatures or [tau])]
        self.smoothing, self.topk, self.amp = smoothing, topk, amp

    def train(self, mode: bool = True) -> DistillationTask:
        """Training mode for the student only: a live teacher stays frozen in eval mode."""
        self.student.train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        self.training = mode
        return self

    def prepare_distributed(self, device: torch.device) -> None:
        """Wrap the student for data-parallel training (call once the process group exists)."""
        self.student = DistributedDataParallel(
            self.student, device_ids=[device.index] if device.type == "cuda" else None
        )

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce (accumulation micro-steps); a no-op without DDP."""
        if isinstance(self.student, DistributedDataParallel):
            return self.student.no_sync()
        return contextlib.nullcontext()

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
        cls_logits, dist_logits = outputs if isinstance(outputs, tuple | list) else (outputs, outputs)
        base = losses.soft_cross_entropy(cls_logits, target)
        if self.distillation == "none":
            return TaskOutput(base, base.detach(), torch.zeros_like(base).detach())
        values, indices, lse = self.teacher_targets(batch)
        if self.distillation == "hard":
            distill = losses.hard_distillation(dist_logits, indices[:, 0])
        else:
            t = self.temperatures.index(self.tau)
            probs = soft_target_probs(values, indices, lse[:, t], self.tau, self.num_classes)
            distill = losses.soft_distillation(dist_logits, probs, self.tau)
        return TaskOutput(losses.combine(base, distill, self.alpha), base.detach(), distill.detach())

    def forward(self, batch: dict[str, torch.Tensor]) -> TaskOutput:
        with autocast(batch["pixels"].device, self.amp):
            outputs = self.student(batch["pixels"])
        return self.loss(outputs, batch)
