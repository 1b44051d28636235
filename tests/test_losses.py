"""Our distillation targets and losses against DeiT's published formulas, on random tensors.

DeiT's ``DistillationLoss`` (facebookresearch/deit, ``losses.py``) is restated here verbatim as the
reference: soft = ``kl_div(log_softmax(s/T), log_softmax(t/T), 'sum', log_target=True) * T*T /
s.numel()``, hard = ``cross_entropy(s, t.argmax(1))``, total = ``base * (1 - alpha) + distill *
alpha`` with ``base`` timm's SoftTargetCrossEntropy of the class head on mixup targets.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy

from pipeline.models import losses
from pipeline.models.targets import Reduction, soft_target_probs, topk_targets
from pipeline.models.task import DistillationTask

C = 10


def deit_soft(s: torch.Tensor, t: torch.Tensor, tau: float) -> torch.Tensor:
    return (
        F.kl_div(F.log_softmax(s / tau, dim=1), F.log_softmax(t / tau, dim=1), reduction="sum", log_target=True)
        * (tau * tau)
        / s.numel()
    )


def deit_hard(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(s, t.argmax(dim=1))


def logits(n: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float() * scale


def cached_targets(
    t: torch.Tensor, k: int, temps: list[float], tau: float, half: bool = False
) -> dict[str, torch.Tensor]:
    """What a batch carries in cached mode for one teacher (``half=True``: the cache's fp16 values): values
    and indices ``[n, 1, K]``, the logsumexp at the first cached temperature and at ``tau`` ``[n, 1, 2]``."""
    values, indices, lse = topk_targets(t, k, temps, half=half)
    columns = lse[:, [0, temps.index(tau)]]
    return {"t_values": values.float()[:, None], "t_indices": indices[:, None], "t_lse": columns[:, None]}


def rebuilt(t: torch.Tensor, k: int, temps: list[float], tau: float, half: bool = False) -> tuple[torch.Tensor, dict]:
    """The dense teacher distribution at ``tau`` rebuilt from what the cache keeps."""
    c = cached_targets(t, k, temps, tau, half)
    v, i, lse = c["t_values"][:, 0], c["t_indices"][:, 0], c["t_lse"][:, 0]
    return soft_target_probs(v, i, lse[:, 0], lse[:, 1], temps[0], tau, C), {"t_indices": i}


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_soft_target_probs_full_k_is_the_softmax(tau: float) -> None:
    t = logits(8, 0)
    probs, _ = rebuilt(t, C, [1.0, 3.0], tau)
    torch.testing.assert_close(probs, F.softmax(t / tau, dim=1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_soft_target_probs_top_k_exact_rest_uniform(k: int) -> None:
    tau = 3.0
    t = logits(16, 1)
    probs, c = rebuilt(t, k, [1.0, tau], tau)
    exact = F.softmax(t / tau, dim=1)
    top = probs.gather(1, c["t_indices"])
    torch.testing.assert_close(top, exact.gather(1, c["t_indices"]), rtol=0, atol=1e-6)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(16), rtol=0, atol=1e-6)
    rest_mask = torch.ones_like(probs, dtype=torch.bool).scatter_(1, c["t_indices"], False)
    rest = probs[rest_mask].view(16, C - k)
    expected = (1.0 - exact.gather(1, c["t_indices"]).sum(dim=1, keepdim=True)) / (C - k)
    torch.testing.assert_close(rest, expected.expand(-1, C - k), rtol=0, atol=1e-6)
    # The top-k entries stay the k largest: the uniform rest never outranks a cached class.
    assert (top.min(dim=1).values >= rest.max(dim=1).values - 1e-7).all()


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
def test_soft_distillation_matches_deit(tau: float) -> None:
    s, t = logits(8, 2), logits(8, 3)
    probs, _ = rebuilt(t, C, [1.0, tau], tau)
    ours = losses.soft_distillation(s, probs, tau)
    torch.testing.assert_close(ours, deit_soft(s, t, tau), rtol=1e-5, atol=1e-6)


def test_soft_distillation_fp16_cache_is_close_to_deit() -> None:
    """With K < C and fp16 values (what the cache stores) the loss stays near the exact one."""
    tau = 3.0
    s, t = logits(32, 4), logits(32, 5, scale=5.0)
    probs, _ = rebuilt(t, 5, [1.0, tau], tau, half=True)
    assert torch.isfinite(probs).all() and (probs >= 0).all()
    ours = losses.soft_distillation(s, probs, tau)
    torch.testing.assert_close(ours, deit_soft(s, t, tau), rtol=0.05, atol=1e-3)


def test_hard_distillation_matches_deit() -> None:
    s, t = logits(8, 6), logits(8, 7)
    _, indices, _ = topk_targets(t, 3, [1.0])
    torch.testing.assert_close(losses.hard_distillation(s, indices[:, 0]), deit_hard(s, t))


def test_mixed_targets_match_timm_mixup_target() -> None:
    label = torch.tensor([3, 1, 4, 1, 5, 9])
    lam = 0.7
    ours = losses.mixed_targets(label, label.flip(0), torch.full((6,), lam), C, smoothing=0.1)
    torch.testing.assert_close(ours, mixup_target(label, C, lam, smoothing=0.1))


@pytest.mark.parametrize(("distillation", "tau"), [("hard", 1.0), ("soft", 1.0), ("soft", 3.0)])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9])
def test_task_loss_matches_deit_distillation_loss(distillation: str, tau: float, alpha: float) -> None:
    """DistillationTask.loss == DeiT's DistillationLoss with a SoftTargetCrossEntropy base criterion."""
    n = 6
    cls_out, dist_out, t = logits(n, 8), logits(n, 9), logits(n, 10)
    label = torch.tensor([0, 2, 4, 6, 8, 9])
    partner = torch.tensor([9, 8, 6, 4, 2, 0])  # label.flip(0), so timm's mixup_target is the reference
    lam = 0.6
    batch = {
        "label": label,
        "mix_label": partner,
        "lam": torch.full((n,), lam),
        **cached_targets(t, C, [1.0, 3.0], tau),
    }
    task = DistillationTask(
        student=torch.nn.Identity(),
        num_classes=C,
        distillation=distillation,  # type: ignore[arg-type]
        alpha=alpha,
        tau=tau,
        reductions=[Reduction(C, (1.0, 3.0))],
        smoothing=0.1,
    )
    out = task.loss((cls_out, dist_out), batch)

    base = SoftTargetCrossEntropy()(cls_out, mixup_target(label, C, lam, smoothing=0.1))
    distill = deit_hard(dist_out, t) if distillation == "hard" else deit_soft(dist_out, t, tau)
    torch.testing.assert_close(out.loss, base * (1 - alpha) + distill * alpha, rtol=1e-5, atol=1e-6)
    assert float(out.base_loss) == pytest.approx(float(base), rel=1e-5)
    assert float(out.distill_loss) == pytest.approx(float(distill), rel=1e-5)


def test_task_none_trains_the_class_head_only_as_deit() -> None:
    """DeiT's ``none`` on a distilled model: the class head learns the labels, the distillation head
    gets no loss (DistillationLoss returns the base loss before looking at ``outputs_kd``)."""
    cls_out, dist_out = logits(4, 11).requires_grad_(), logits(4, 12).requires_grad_()
    label = torch.tensor([1, 2, 3, 4])
    batch = {"label": label, "mix_label": label, "lam": torch.ones(4)}
    task = DistillationTask(student=torch.nn.Identity(), num_classes=C, distillation="none", smoothing=0.0)
    out = task.loss((cls_out, dist_out), batch)
    torch.testing.assert_close(out.loss, F.cross_entropy(cls_out, label))
    assert float(out.distill_loss) == 0.0
    out.loss.backward()
    assert cls_out.grad is not None and cls_out.grad.abs().sum() > 0
    assert dist_out.grad is None, "the distillation head must get no gradient"
    # A model with one head trains it on the labels.
    single = task.loss(cls_out, batch)
    torch.testing.assert_close(single.loss, F.cross_entropy(cls_out, label))


def test_uncached_tau_is_refused_by_the_config() -> None:
    from pipeline.config import checked
    from pipeline.errors import ConfigError
    from pipeline.train_options import TrainConfig

    live = TrainConfig(shards=["x.tar"], distillation="soft", teacher_mode="live", teacher_checkpoint="t.pth")
    with pytest.raises(ConfigError, match=r"--tau 2\.0 is not one of --temperatures \[1\.0, 3\.0\]"):
        checked(dataclasses.replace(live, tau=2.0))
    assert checked(dataclasses.replace(live, tau=3.0)).tau == 3.0
