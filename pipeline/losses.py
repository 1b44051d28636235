"""Targets and losses of DeiT-style distillation, from cached top-k logits.

Soft targets at temperature ``tau`` are rebuilt from the cache: the top-k probabilities
``exp(values / tau - logsumexp_tau)`` are exact; the remaining mass is spread uniformly over the
other classes. The soft distillation loss is ``KL(target || softmax(student / tau)) * tau^2``
normalised by ``numel`` of the student logits, exactly as DeiT's ``DistillationLoss`` does
(``reduction='sum'`` then ``/ outputs_kd.numel()``), so ``alpha`` and ``tau`` keep DeiT's meaning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mixed_targets(
    label: torch.Tensor, mix_label: torch.Tensor, lam: torch.Tensor, num_classes: int, smoothing: float
) -> torch.Tensor:
    """Dense ground-truth targets of mixed views with label smoothing (timm's ``mixup_target``)."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    a = torch.full((label.shape[0], num_classes), off, device=label.device).scatter_(1, label[:, None], on)
    b = torch.full((label.shape[0], num_classes), off, device=label.device).scatter_(1, mix_label[:, None], on)
    lam = lam.float()[:, None]
    return a * lam + b * (1.0 - lam)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def soft_target_probs(
    values: torch.Tensor, indices: torch.Tensor, lse: torch.Tensor, tau: float, num_classes: int
) -> torch.Tensor:
    """Dense teacher distribution at ``tau`` from top-k logits and the full logsumexp.

    Args:
        values: ``[n, K]`` top-k teacher logits.
        indices: ``[n, K]`` their class ids.
        lse: ``[n]`` logsumexp of all teacher logits divided by ``tau``.
    """
    top = torch.exp(values.float() / tau - lse.float()[:, None])
    k = values.shape[1]
    rest = (1.0 - top.sum(dim=1, keepdim=True)).clamp_min(0.0)
    # With K == num_classes every entry is overwritten by the scatter, so the fill value is moot.
    dense = (rest / max(num_classes - k, 1)).expand(-1, num_classes).clone()
    return dense.scatter_(1, indices.long(), top)


def soft_distillation(student_logits: torch.Tensor, target_probs: torch.Tensor, tau: float) -> torch.Tensor:
    """DeiT's soft distillation: ``sum KL(p_teacher || p_student) * tau^2 / numel``."""
    log_q = F.log_softmax(student_logits.float() / tau, dim=-1)
    p = target_probs.float()
    kl = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-30)) - log_q), torch.zeros_like(p))
    return kl.sum() * (tau * tau) / student_logits.numel()


def hard_distillation(student_logits: torch.Tensor, teacher_top1: torch.Tensor) -> torch.Tensor:
    """DeiT's hard distillation: cross entropy with the teacher's argmax."""
    return F.cross_entropy(student_logits.float(), teacher_top1.long())


def combine(base: torch.Tensor, distill: torch.Tensor, alpha: float) -> torch.Tensor:
    return base * (1.0 - alpha) + distill * alpha
