"""Many teachers over one set of views (issue 23): caches made over the same views by other teachers are
combined by train-student (their targets belong to the same pixels, row for row), live teachers give the
same targets as their caches, a cache over other views is refused naming the field, and cache-status
compares the teachers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import student_config, tiny_cache_config
from typer.testing import CliRunner

from cli.main import app
from pipeline.cache import open_cache
from pipeline.errors import ConfigError
from pipeline.models.targets import Reduction, soft_target_probs
from pipeline.models.task import DistillationTask
from pipeline.options import CacheConfig
from pipeline.phase1.cache_teacher import run as cache_teacher
from pipeline.phase2.train import train

pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = {"views": 2, "view_block": 1}


@pytest.fixture(scope="module")
def two(digits_shards: str, tiny_teacher: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Cache A by the suite's teacher; cache B by another teacher (other weights), made with --like A."""
    folder = tmp_path_factory.mktemp("teachers")
    other = folder / "other.pth"
    weights = torch.load(tiny_teacher, weights_only=True)
    g = torch.Generator().manual_seed(1)
    # multiplicative noise keeps BatchNorm's running variances positive (additive noise made some negative:
    # NaN logits, which cache-teacher refuses)
    noisy = {
        k: v * (1 + 0.1 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v for k, v in weights.items()
    }
    torch.save(noisy, other)
    a, b = folder / "a.zarr", folder / "b.zarr"
    cache_teacher(tiny_cache_config(digits_shards, tiny_teacher, a, **SETTINGS))
    cache_teacher(
        CacheConfig(
            like=str(a),
            out=str(b),
            teacher="regnetx_002",
            teacher_checkpoint=str(other),
            topk=4,
            workers=0,
            progress="off",
        )
    )
    return {"a": str(a), "b": str(b), "ta": tiny_teacher, "tb": str(other)}


def test_like_caches_the_same_views_for_another_teacher(two: dict[str, str]) -> None:
    a, b = open_cache(two["a"]).meta, open_cache(two["b"]).meta
    assert a.views_fingerprint == b.views_fingerprint and a.teacher_fingerprint != b.teacher_fingerprint
    assert (b.topk, b.seed, b.views, b.recipe) == (4, a.seed, a.views, a.recipe)
    ga, gb = zarr.open_group(two["a"], mode="r"), zarr.open_group(two["b"], mode="r")
    for name in ("keys", "labels", "digests", "pixel_digests"):  # the same rows, the same replayed pixels
        assert np.array_equal(np.asarray(ga[name][...]), np.asarray(gb[name][...])), name


def test_two_cached_teachers_train_as_the_same_two_live(
    two: dict[str, str], digits_shards: str, tmp_path: Path
) -> None:
    base = student_config(digits_shards, [two["a"], two["b"]], tmp_path / "cached", teacher_weights=[0.7, 0.3])
    train(base)
    live = dataclasses.replace(
        base, out=str(tmp_path / "live"), teacher_mode="live", teacher_checkpoint=[two["ta"], two["tb"]]
    )
    train(live)
    x, y = (torch.load(tmp_path / r / "last.pth", weights_only=True)["model"] for r in ("cached", "live"))
    assert all(torch.equal(x[k], y[k]) for k in x), "two cached teachers must train as the same two live"
    alone = dataclasses.replace(base, out=str(tmp_path / "alone"), cache=[two["a"]], teacher_weights=[])
    train(alone)
    z = torch.load(tmp_path / "alone" / "last.pth", weights_only=True)["model"]
    assert any(not torch.equal(x[k], z[k]) for k in x), "the second teacher changes the targets"


def test_a_cache_over_other_views_is_refused_naming_the_field(two, digits_shards, tiny_teacher, tmp_path) -> None:
    other = tmp_path / "seed7.zarr"
    cache_teacher(tiny_cache_config(digits_shards, tiny_teacher, other, seed=7, **SETTINGS))
    cfg = student_config(digits_shards, [two["a"], str(other)], tmp_path / "run")
    with pytest.raises(ConfigError, match=r"was not made over the views of --cache .*: seed: cache has 7, requested 0"):
        train(cfg)


def test_weights_choose_how_the_teachers_combine() -> None:
    """Hard: the argmax of the weighted mean of the teachers' distributions at tau 1; soft: their weighted mean."""
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(6, 10, generator=g) * 3 for _ in range(2)]
    values, indices, lse = [], [], []
    for t in logits:
        top, idx = t.topk(5, dim=1)
        l1, l3 = torch.logsumexp(t, 1), torch.logsumexp(t / 3, 1)
        values.append(top - l1[:, None])
        indices.append(idx)
        lse.append(torch.stack([l1, l3], 1))
    batch = {"t_values": torch.stack(values, 1), "t_indices": torch.stack(indices, 1), "t_lse": torch.stack(lse, 1)}
    how = [Reduction(5, (1.0, 3.0))] * 2

    def target(distillation: str, weights: list[float], tau: float = 1.0) -> torch.Tensor:
        task = DistillationTask(
            student=torch.nn.Identity(),
            num_classes=10,
            distillation=distillation,
            tau=tau,
            weights=weights,
            reductions=how,
        )
        b = batch if distillation == "hard" or tau == 1.0 else {**batch, "t_lse": batch["t_lse"]}
        return task.distill_target(b)

    assert torch.equal(target("hard", [1.0, 0.0]), indices[0][:, 0])
    assert torch.equal(target("hard", [0.0, 1.0]), indices[1][:, 0])
    probs = [soft_target_probs(values[m], indices[m], lse[m][:, 0], lse[m][:, 1], 1.0, 3.0, 10) for m in range(2)]
    torch.testing.assert_close(target("soft", [0.25, 0.75], tau=3.0), 0.25 * probs[0] + 0.75 * probs[1])
    mixed = target("hard", [0.5, 0.5])
    dense = [soft_target_probs(values[m], indices[m], lse[m][:, 0], lse[m][:, 0], 1.0, 1.0, 10) for m in range(2)]
    assert torch.equal(mixed, (0.5 * dense[0] + 0.5 * dense[1]).argmax(1))


def test_cache_status_compares_the_teachers(two: dict[str, str]) -> None:
    result = CliRunner().invoke(app, ["cache-status", two["a"], two["b"]])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{") :])
    (pair,) = report["teachers"]["pairs"]
    ga, gb = zarr.open_group(two["a"], mode="r"), zarr.open_group(two["b"], mode="r")
    valid = np.asarray(ga["labels"][...]) >= 0
    top_a, top_b = (np.asarray(g["indices"][...])[:, valid, 0] for g in (ga, gb))
    assert pair["top1_agreement"] == round(float((top_a == top_b).mean()), 4)
    assert 0.0 < pair["top1_agreement"] <= 1.0 and set(pair["mean_kl"]) == {"1.0", "3.0"}
    assert all(v >= 0 for v in pair["mean_kl"].values())
