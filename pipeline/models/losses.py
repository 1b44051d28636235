"""The losses of DeiT-style distillation, on timm's and torch's own functions.

The soft distillation loss is ``KL(target || softmax(student / tau)) * tau^2`` summed and divided by
``numel`` of the student logits, exactly as DeiT's ``DistillationLoss`` does (``reduction='sum'``
then ``/ outputs_kd.numel()``), so ``alpha`` and ``tau`` keep DeiT's meaning. The teacher's side of
it (top-k logits to a dense distribution) is :mod:`pipeline.models.targets`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.data.mixup import one_hot


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
