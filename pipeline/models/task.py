"""The distillation task: owns the student's forward pass and the loss, so the training loop knows
nothing about teachers, caches or heads (the shape of timm's ``task/`` modules). The loss itself, and the
teachers' targets it reads from a batch or computes live, is :class:`~pipeline.models.losses.DistillationLoss`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.models.build import autocast
from pipeline.models.losses import Distillation, DistillationLoss, TaskOutput
from pipeline.models.targets import Reduction

log = logging.getLogger(__name__)


class DistillationTask(nn.Module):
    """Student forward + DeiT loss (:class:`~pipeline.models.losses.DistillationLoss`, whose arguments these are).

    Args:
        student: Model taking replayed pixels; returns ``(cls, dist)`` logits for a distilled model in
            training mode, or one tensor.
        amp: bf16 autocast of the student on CUDA (no effect on CPU).
        Others: those of :class:`~pipeline.models.losses.DistillationLoss`.
    """

    def __init__(
        self,
        *,
        student: nn.Module,
        num_classes: int,
        distillation: Distillation = "hard",
        alpha: float = 0.5,
        tau: float = 1.0,
        weights: list[float] | None = None,
        teachers: list[nn.Module] | None = None,
        reductions: list[Reduction] | None = None,
        smoothing: float = 0.1,
        amp: bool = True,
    ):
        super().__init__()
        self.student = student
        self.criterion = DistillationLoss(
            num_classes=num_classes,
            distillation=distillation,
            alpha=alpha,
            tau=tau,
            weights=weights,
            teachers=teachers,
            reductions=reductions,
            smoothing=smoothing,
        )
        self.amp = amp
        self.single_batches = 0  # training batches of one sample normalised with BatchNorm's running statistics

    @property
    def target_tau(self) -> float | None:
        """The one temperature whose logsumexp the targets need (None: a single teacher's hard argmax)."""
        return self.criterion.target_tau

    def train(self, mode: bool = True) -> DistillationTask:
        """Training mode for the student only: live teachers stay frozen in eval mode."""
        self.student.train(mode)
        self.criterion.train(mode)
        self.training = mode
        return self

    def prepare_distributed(self, device: torch.device) -> None:
        """Wrap the student for data-parallel training (call once the process group exists).

        A head that gets no loss (the distillation head with ``--distillation none``) has no gradient:
        DDP must then look for unused parameters, or it stops at the next step.
        """
        unused = self.criterion.distillation == "none" and hasattr(self.student_net, "head_dist")
        self.student = DistributedDataParallel(
            self.student,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=unused,
        )

    @property
    def student_net(self) -> nn.Module:
        inner = self.student.module if isinstance(self.student, DistributedDataParallel) else self.student
        return getattr(inner, "net", inner)

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce (accumulation micro-steps); a no-op without DDP."""
        if isinstance(self.student, DistributedDataParallel):
            return self.student.no_sync()
        return contextlib.nullcontext()

    def distill_target(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.criterion.distill_target(batch)

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> TaskOutput:
        return self.criterion.terms(outputs, batch)

    def forward(self, batch: dict[str, torch.Tensor]) -> TaskOutput:
        pixels = batch["pixels"]
        with autocast(pixels.device, self.amp), self._one_sample_batch_norm(pixels.shape[0]):
            outputs = self.student(pixels)
        return self.loss(outputs, batch)

    @contextlib.contextmanager
    def _one_sample_batch_norm(self, rows: int) -> Iterator[None]:
        """A training batch of one sample (the last of a rank's epoch can be) has no batch statistics:
        BatchNorm raises on it where a feature map is 1x1 (a ResNet's last stage at 32 px) and would
        otherwise normalise it by itself and pull its running statistics toward one image. For that
        forward, the student's BatchNorm layers use their running statistics (eval mode) and leave them
        unchanged; the sample is still trained, the step is still taken on every rank (DDP and gradient
        accumulation stay in step), and each such batch is counted and logged."""
        norms = [] if rows != 1 or not self.training else [m for m in self.student_net.modules() if _is_bn(m)]
        if not any(m.training for m in norms):
            yield
            return
        self.single_batches += 1
        log.warning(
            "a training batch of 1 sample (the last of this rank's epoch): %s's %d BatchNorm layers normalised it "
            "with their running statistics, as one sample has no batch statistics (%d such batch(es) so far)",
            type(self.student_net).__name__,
            len(norms),
            self.single_batches,
        )
        modes = [m.training for m in norms]
        for m in norms:
            m.eval()
        try:
            yield
        finally:
            for m, mode in zip(norms, modes, strict=True):
                m.train(mode)


def _is_bn(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)
