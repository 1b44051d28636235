"""Teacher targets: what the cache stores for a batch of teacher logits, and the soft targets rebuilt
from it (both phases and the live mode use these, so cached and live targets go through one path)."""

from __future__ import annotations

import torch

from .errors import ConfigError


@torch.no_grad()
def topk_targets(
    logits: torch.Tensor, k: int, temperatures: list[float], half: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the cache stores for a batch of teacher logits.

    Returns:
        ``values`` (top-k logits, descending; float16 as stored unless ``half=False``), ``indices``
        (int64) and ``logsumexp`` of ``logits / tau`` for each temperature (float32, ``[n, T]``),
        all computed in float32.
    """
    logits = logits.float()
    if k > logits.shape[-1]:
        raise ConfigError(f"--topk {k} is larger than the number of classes {logits.shape[-1]}")
    values, indices = torch.topk(logits, k, dim=-1, largest=True, sorted=True)
    lse = torch.stack([torch.logsumexp(logits / t, dim=-1) for t in temperatures], dim=-1)
    return (values.half() if half else values), indices, lse


def soft_target_probs(
    values: torch.Tensor, indices: torch.Tensor, lse: torch.Tensor, tau: float, num_classes: int
) -> torch.Tensor:
    """Dense teacher distribution at ``tau`` from top-k logits and the full logsumexp.

    The top-k probabilities ``exp(values / tau - lse)`` are exact; the remaining mass is spread
    uniformly over the other classes (TinyViT's choice).

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
