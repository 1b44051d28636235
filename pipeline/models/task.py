"""The distillation task: owns the student's forward pass and the loss, so the training loop knows
nothing about teachers, caches or heads (the shape of timm's ``task/`` modules).

Teacher targets arrive in the batch (``t_values``, ``t_indices``, ``t_lse``) in cached mode, or
are computed here by live teachers on the very same pixels, through the caches' own reduction (float16
values included), so the two modes give the same targets.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.models import losses
from pipeline.models.build import autocast
from pipeline.models.targets import Reduction, soft_target_probs, target_temperature, teacher_outputs

log = logging.getLogger(__name__)

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

    With several teachers (caches made over the same views, or live teachers), the distillation target
    is their weighted combination: for ``soft``, the weighted mean of their rebuilt distributions at
    ``tau``; for ``hard``, the argmax of the weighted mean of their distributions at temperature 1. One
    teacher's hard target is its argmax, ``indices[..., 0]``, exactly as DeiT's.

    Args:
        student: Model taking replayed pixels; returns ``(cls, dist)`` logits for a distilled model in
            training mode, or one tensor.
        num_classes: Number of classes.
        distillation: ``hard``, ``soft`` (KL at ``tau``) or ``none``: the class head learns the labels
            and the distillation head gets no loss, as in DeiT.
        alpha: Weight of the distillation term.
        tau: Temperature of soft distillation.
        weights: Per teacher, summing to 1.
        teachers: Live teachers (frozen, normalising their own input), or ``[]`` in cached mode: the
            targets then arrive in the batch (``t_values``/``t_indices`` ``[n, M, K]``, ``t_lse``
            ``[n, M, 2]`` at the teacher's first temperature and at the one the target needs).
        reductions: How each live teacher's logits are reduced: the cache's own reduction, so live and
            cached targets are the same numbers.
        smoothing: Label smoothing of the ground-truth term.
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
        weights: list[float] | None = None,
        teachers: list[nn.Module] | None = None,
        reductions: list[Reduction] | None = None,
        smoothing: float = 0.1,
        amp: bool = True,
    ):
        super().__init__()
        self.student = student
        self.teachers = nn.ModuleList(teachers or [])
        self.num_classes, self.distillation = num_classes, distillation
        self.alpha, self.tau = float(alpha), float(tau)
        self.weights = list(weights or [1.0])
        self.reductions = list(reductions or [])
        self.t0 = [how.temperatures[0] for how in self.reductions] or [1.0]  # the values' temperature
        self.smoothing, self.amp = smoothing, amp
        self.single_batches = 0  # training batches of one sample normalised with BatchNorm's running statistics

    @property
    def target_tau(self) -> float | None:
        """The one temperature whose logsumexp the targets need (None: a single teacher's hard argmax)."""
        return target_temperature(self.distillation, self.tau, len(self.weights))

    def train(self, mode: bool = True) -> DistillationTask:
        """Training mode for the student only: live teachers stay frozen in eval mode."""
        self.student.train(mode)
        self.teachers.eval()
        self.training = mode
        return self

    def prepare_distributed(self, device: torch.device) -> None:
        """Wrap the student for data-parallel training (call once the process group exists).

        A head that gets no loss (the distillation head with ``--distillation none``) has no gradient:
        DDP must then look for unused parameters, or it stops at the next step.
        """
        unused = self.distillation == "none" and hasattr(self.student_net, "head_dist")
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

    def teacher_targets(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(values, indices, lse)`` ``[n, M, K]``, ``[n, M, K]``, ``[n, M, 2]``: from the batch (cached) or
        the live teachers, reduced exactly as their caches reduce them (float16 values included). The two
        logsumexp columns are at each teacher's first cached temperature and at :attr:`target_tau`."""
        if not len(self.teachers):
            return batch["t_values"], batch["t_indices"], batch["t_lse"]
        out = []
        for teacher, how in zip(self.teachers, self.reductions, strict=True):
            with torch.inference_mode(), autocast(batch["pixels"].device):
                logits = teacher(batch["pixels"])
            t = teacher_outputs(logits, how)
            tau = self.target_tau
            lse = t["logsumexp"][:, [0, how.temperatures.index(tau)]] if tau is not None else t["logsumexp"][:, :0]
            out.append((t["values"].float().clone(), t["indices"].clone(), lse.clone()))
        width = max(v.shape[1] for v, _, _ in out)
        pad = [
            (
                torch.nn.functional.pad(v, (0, width - v.shape[1])),
                torch.nn.functional.pad(i, (0, width - i.shape[1]), value=-1),
                lse,
            )
            for v, i, lse in out
        ]
        return tuple(torch.stack(parts, dim=1) for parts in zip(*pad, strict=True))  # type: ignore[return-value]

    def distill_target(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Class ids (hard) or a dense distribution (soft) for the distillation head."""
        values, indices, lse = self.teacher_targets(batch)
        if self.distillation == "hard" and len(self.weights) == 1:
            return indices[:, 0, 0]
        tau = self.target_tau
        probs = sum(
            w
            * soft_target_probs(
                values[:, m], indices[:, m], lse[:, m, 0], lse[:, m, 1], self.t0[m], tau, self.num_classes
            )
            for m, w in enumerate(self.weights)
        )
        return probs.argmax(dim=1) if self.distillation == "hard" else probs

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> TaskOutput:
        target = losses.mixed_targets(
            batch["label"], batch["mix_label"], batch["lam"], self.num_classes, self.smoothing
        )
        cls_logits, dist_logits = outputs if isinstance(outputs, tuple | list) else (outputs, outputs)
        base = losses.soft_cross_entropy(cls_logits, target)
        if self.distillation == "none":
            return TaskOutput(base, base.detach(), torch.zeros_like(base).detach())
        teacher = self.distill_target(batch)
        if self.distillation == "hard":
            distill = losses.hard_distillation(dist_logits, teacher)
        else:
            distill = losses.soft_distillation(dist_logits, teacher, self.tau)
        return TaskOutput(losses.combine(base, distill, self.alpha), base.detach(), distill.detach())

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
