"""The losses of DeiT-style distillation, on timm's and torch's own functions, and :class:`DistillationLoss`, the
module that applies them to a student's outputs and a batch (train-student's task and the public API share it).

The soft distillation loss is ``KL(target || softmax(student / tau)) * tau^2`` summed and divided by
``numel`` of the student logits, exactly as DeiT's ``DistillationLoss`` does (``reduction='sum'``
then ``/ outputs_kd.numel()``), so ``alpha`` and ``tau`` keep DeiT's meaning. The teacher's side of
it (top-k logits to a dense distribution) is :mod:`pipeline.models.targets`.

Teacher targets arrive in the batch (``t_values``, ``t_indices``, ``t_lse``) in cached mode, or are computed
here by live teachers on the very same pixels, through the caches' own reduction (float16 values included), so
the two modes give the same targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.data.mixup import one_hot
from torch import nn

from pipeline.errors import ConfigError
from pipeline.models.build import autocast
from pipeline.models.targets import Reduction, soft_target_probs, target_temperature, teacher_outputs

Distillation = Literal["none", "hard", "soft"]


def mixed_targets(
    label: torch.Tensor, mix_label: torch.Tensor, lam: torch.Tensor, num_classes: int, smoothing: float
) -> torch.Tensor:
    """Dense ground-truth targets of mixed views with label smoothing (timm's ``mixup_target``, with
    a lambda and a partner per view instead of one lambda and a flipped batch)."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    lam = lam.float()[:, None]
    return one_hot(label, num_classes, on, off) * lam + one_hot(mix_label, num_classes, on, off) * (1.0 - lam)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross entropy with a dense target distribution, averaged over the batch (timm's
    ``SoftTargetCrossEntropy``)."""
    return F.cross_entropy(logits.float(), target)


def soft_distillation(student_logits: torch.Tensor, target_probs: torch.Tensor, tau: float) -> torch.Tensor:
    """DeiT's soft distillation: ``sum KL(p_teacher || p_student) * tau^2 / numel``."""
    log_q = F.log_softmax(student_logits.float() / tau, dim=-1)
    return F.kl_div(log_q, target_probs.float(), reduction="sum") * (tau * tau) / student_logits.numel()


def hard_distillation(student_logits: torch.Tensor, teacher_top1: torch.Tensor) -> torch.Tensor:
    """DeiT's hard distillation: cross entropy with the teacher's argmax."""
    return F.cross_entropy(student_logits.float(), teacher_top1.long())


def combine(base: torch.Tensor, distill: torch.Tensor, alpha: float) -> torch.Tensor:
    return base * (1.0 - alpha) + distill * alpha


@dataclass
class TaskOutput:
    """The loss to backpropagate and its two terms (detached), all on the device: reading them
    back to the host is the caller's choice, once per step."""

    loss: torch.Tensor
    base_loss: torch.Tensor
    distill_loss: torch.Tensor


class DistillationLoss(nn.Module):
    """DeiT's loss on a student's outputs and a batch: ``(1 - alpha) * CE(cls head, mixed labels) + alpha * distill``.

    With several teachers (caches made over the same views, or live teachers), the distillation target
    is their weighted combination: for ``soft``, the weighted mean of their rebuilt distributions at
    ``tau``; for ``hard``, the argmax of the weighted mean of their distributions at temperature 1. One
    teacher's hard target is its argmax, ``indices[..., 0]``, exactly as DeiT's.

    Args:
        num_classes: Number of classes.
        distillation: ``hard``, ``soft`` (KL at ``tau``) or ``none``: the class head learns the labels
            and the distillation head gets no loss, as in DeiT.
        alpha: Weight of the distillation term.
        tau: Temperature of soft distillation.
        weights: Per teacher, summing to 1.
        teachers: Live teachers (frozen, normalising their own input), or ``[]`` in cached mode: the
            targets then arrive in the batch (``t_values``/``t_indices`` ``[n, M, K]``, ``t_lse``
            ``[n, M, 2]`` at the teacher's first temperature and at the one the target needs).
        reductions: How each teacher's logits are (or were, for a cache) reduced: its first temperature
            is the one its values are stored at, and live targets go through the cache's own reduction.
        smoothing: Label smoothing of the ground-truth term.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        distillation: Distillation = "hard",
        alpha: float = 0.5,
        tau: float = 1.0,
        weights: list[float] | None = None,
        teachers: list[nn.Module] | None = None,
        reductions: list[Reduction] | None = None,
        smoothing: float = 0.1,
    ):
        super().__init__()
        self.teachers = nn.ModuleList(teachers or [])
        self.num_classes, self.distillation = num_classes, distillation
        self.alpha, self.tau = float(alpha), float(tau)
        self.weights = list(weights or [1.0])
        self.reductions = list(reductions or [])
        self.t0 = [how.temperatures[0] for how in self.reductions] or [1.0]  # the values' temperature
        self.smoothing = smoothing

    @property
    def target_tau(self) -> float | None:
        """The one temperature whose logsumexp the targets need (None: a single teacher's hard argmax)."""
        return target_temperature(self.distillation, self.tau, len(self.weights))

    def train(self, mode: bool = True) -> DistillationLoss:
        """Live teachers stay frozen in eval mode whatever the mode asked for."""
        super().train(mode)
        self.teachers.eval()
        return self

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
            (F.pad(v, (0, width - v.shape[1])), F.pad(i, (0, width - i.shape[1]), value=-1), lse) for v, i, lse in out
        ]
        return tuple(torch.stack(parts, dim=1) for parts in zip(*pad, strict=True))  # type: ignore[return-value]

    def distill_target(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Class ids (hard) or a dense distribution (soft) for the distillation head."""
        values, indices, lse = self.teacher_targets(batch)
        if self.distillation == "hard" and len(self.weights) == 1:
            return indices[:, 0, 0]
        tau = self.target_tau
        if lse.shape[-1] != 2:
            raise ConfigError(
                f"the batch holds no logsumexp at tau {tau} that {self.distillation} distillation needs: make the "
                f"data source with the loss's distillation ({self.distillation!r}) and tau ({self.tau:g})"
            )
        probs = sum(
            w
            * soft_target_probs(
                values[:, m], indices[:, m], lse[:, m, 0], lse[:, m, 1], self.t0[m], tau, self.num_classes
            )
            for m, w in enumerate(self.weights)
        )
        return probs.argmax(dim=1) if self.distillation == "hard" else probs

    def labels(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The ground truth as dense targets: the views' labels mixed (mixup/cutmix) and smoothed."""
        return mixed_targets(batch["label"], batch["mix_label"], batch["lam"], self.num_classes, self.smoothing)

    def terms(self, outputs: Any, batch: dict[str, torch.Tensor]) -> TaskOutput:
        """The loss and its two terms, for the student's ``outputs``: ``(cls, dist)`` logits of a distilled
        model in training mode, or one tensor (any classifier: both terms then train its one head)."""
        cls_logits, dist_logits = outputs if isinstance(outputs, tuple | list) else (outputs, outputs)
        base = soft_cross_entropy(cls_logits, self.labels(batch))
        if self.distillation == "none":
            return TaskOutput(base, base.detach(), torch.zeros_like(base).detach())
        teacher = self.distill_target(batch)
        if self.distillation == "hard":
            distill = hard_distillation(dist_logits, teacher)
        else:
            distill = soft_distillation(dist_logits, teacher, self.tau)
        return TaskOutput(combine(base, distill, self.alpha), base.detach(), distill.detach())

    def forward(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss to backpropagate (:meth:`terms` gives its two terms as well)."""
        return self.terms(outputs, batch).loss
