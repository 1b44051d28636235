"""Soft targets with a known error (issue 19): what the cache keeps per row (top-K, or the fewest classes
reaching a mass), the exact tail mass it misses, and where that mass is reported."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from conftest import student_config, tiny_cache_config
from typer.testing import CliRunner

from cli.main import app
from pipeline.models.targets import Reduction, soft_target_probs, tail_mass, teacher_outputs
from pipeline.phase1.cache_teacher import run as cache_teacher
from pipeline.phase2.train import train

pytestmark = pytest.mark.usefixtures("one_thread")
C = 50


def logits(n: int, scale: float, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, C, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("mass, k_min", [(0.5, 1), (0.8, 3), (0.95, 1)])
def test_per_row_k_keeps_the_fewest_classes_reaching_the_mass(mass: float, k_min: int) -> None:
    t = logits(64, 1.0) * torch.linspace(1.0, 24.0, 64)[:, None]  # rows from flat to confident
    out = teacher_outputs(t, Reduction(20, (1.0, 3.0), mass, k_min))
    kept = (out["indices"] >= 0).sum(dim=1)
    p3 = F.softmax(t / 3.0, dim=1).sort(dim=1, descending=True).values.cumsum(dim=1)
    # the fewest classes whose probability at the largest temperature reaches the mass, within [k_min, K]
    expected = (1 + (p3 < mass).sum(dim=1)).clamp(k_min, 20)
    assert torch.equal(kept, expected)
    assert (out["indices"][:, :1] >= 0).all() and (out["values"][out["indices"] < 0] == 0).all()
    assert len(set(kept.tolist())) > 1, "rows of different entropies keep different counts"
    for tau, col in ((1.0, 0), (3.0, 1)):
        probs = soft_target_probs(
            out["values"].float(), out["indices"], out["logsumexp"][:, 0], out["logsumexp"][:, col], 1.0, tau, C
        )
        exact = F.softmax(t / tau, dim=1)
        valid = out["indices"] >= 0
        idx = out["indices"].clamp_min(0)
        torch.testing.assert_close(probs.gather(1, idx)[valid], exact.gather(1, idx)[valid], rtol=2e-3, atol=1e-5)
        torch.testing.assert_close(probs.sum(dim=1), torch.ones(64), rtol=0, atol=1e-5)
        tail = tail_mass(
            out["values"].float(), out["indices"], out["logsumexp"][:, 0], out["logsumexp"][:, col], 1.0, tau
        )
        true_tail = 1 - torch.where(valid, exact.gather(1, idx), torch.zeros(())).sum(dim=1)
        torch.testing.assert_close(tail, true_tail, rtol=0, atol=2e-3)
        # the tail is spread uniformly over the classes a row does not keep
        kept_mask = torch.zeros_like(probs).scatter_add(1, idx, valid.float()) > 0  # (unused columns add 0)
        others = probs.masked_fill(kept_mask, float("nan"))
        spread = tail / (C - valid.sum(dim=1))
        torch.testing.assert_close(others.nanmean(dim=1), spread, rtol=1e-5, atol=1e-7)


def test_log_probabilities_in_float16_have_no_error_floor_on_a_confident_teacher() -> None:
    """Storing logits of 10 to 30 in float16 costs ~1% on a confident teacher's top probability; storing
    log-probabilities (near 0 where probabilities are large) does not."""
    t = logits(256, 8.0) + 20.0  # large, confident logits
    out = teacher_outputs(t, Reduction(10, (1.0,)))
    exact = F.softmax(t, dim=1).max(dim=1).values
    ours = out["values"][:, 0].float().exp()
    raw = torch.exp(t.max(dim=1).values.half().float() - torch.logsumexp(t, dim=1))
    assert (ours / exact - 1).abs().max() < 1e-3 < (raw / exact - 1).abs().max()


@pytest.fixture(scope="module")
def k2(digits_shards: str, tiny_teacher: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tails") / "k2.zarr"
    cache_teacher(tiny_cache_config(digits_shards, tiny_teacher, out, views=2, view_block=1, topk=2))
    return out


def test_cache_status_reports_the_tail_mass_per_temperature(k2: Path) -> None:
    result = CliRunner().invoke(app, ["cache-status", str(k2)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{") :])
    g = zarr.open_group(str(k2), mode="r")
    valid = np.asarray(g["labels"][...]) >= 0
    v = np.asarray(g["values"][...])[:, valid].astype(np.float64)  # log-probabilities at tau 1
    lse = np.asarray(g["logsumexp"][...])[:, valid].astype(np.float64)
    by_hand = {
        "1.0": 1 - np.exp(v).sum(-1),
        "3.0": 1 - np.exp((v + lse[..., :1]) / 3.0 - lse[..., 1:2]).sum(-1),
    }
    for tau, tail in by_hand.items():
        got = report["tail_mass"][tau]
        assert got["mean"] == pytest.approx(tail.mean(), abs=2e-4)
        assert got["p50"] == pytest.approx(np.quantile(tail, 0.5), abs=2e-3)
        assert got["p95"] == pytest.approx(np.quantile(tail, 0.95), abs=2e-3)
    assert report["tail_mass"]["3.0"]["mean"] > report["tail_mass"]["1.0"]["mean"]


def test_soft_distillation_warns_when_the_tail_is_large(k2: Path, digits_shards: str, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING)
    train(
        student_config(
            digits_shards, str(k2), tmp_path / "run", distillation="soft", tau=3.0, epochs=1, max_steps_per_epoch=1
        )
    )
    assert any(
        "soft distillation at tau 3: the cache keeps 2 classes per view, which miss" in r.getMessage()
        for r in caplog.records
    )
