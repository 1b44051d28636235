"""Any timm classifier as the student: a one-head ResNet distilled from the cache, hard and soft.

The student is timm's ``resnet10t`` narrowed to about 0.3M parameters (``channels``, ``stem_width``) at
32 px, where its last stage's feature map is 1x1: BatchNorm there cannot take a training batch of one
sample, which the last batch of a rank's epoch can be. Checked: both loss terms train the one head,
``loss = (1 - alpha) * base + alpha * distill``; a last batch of one sample trains with BatchNorm's
running statistics (counted, logged, the statistics left alone) instead of crashing; ``stillroom
evaluate`` reports ``heads: 1`` with the head's top-1/top-5, equal to timm's own forward.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import pytest
import timm
import torch
from conftest import ROOT, child_env, stillroom_cmd, student_config, tiny_cache_config

from pipeline.phase1.cache_teacher import run as cache_teacher
from pipeline.phase2.train import train
from pipeline.shards.decode import iter_decoded
from pipeline.shards.lists import load_shard_list
from pipeline.views.augment import eval_view
from pipeline.views.pixels import model_input
from pipeline.views.recipe import eval_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

RESNET = "resnet10t"
NARROW = {"channels": [16, 32, 64, 128], "stem_width": 8}


@pytest.fixture(scope="module")
def cache(digits_shards: str, tiny_teacher: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Views 0 and 1 of the 120 digits, K=5, tau in {1, 3}, DeiT's recipe at 32 px, 1 repeat."""
    out = tmp_path_factory.mktemp("cache") / "cache.zarr"
    cache_teacher(tiny_cache_config(digits_shards, tiny_teacher, out, views=2, view_block=1, batch_size=64))
    return str(out)


def resnet_config(shards: str, cache: str, out: Path, **kw):
    base = {"model": RESNET, "model_kwargs": dict(NARROW), "lr": 0.05, "drop_path": 0.05, "epochs": 1}
    return student_config(shards, cache, out, **{**base, **kw})


def read_metrics(out: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("distillation, tau", [("hard", 1.0), ("soft", 3.0)])
def test_one_head_student_learns_labels_and_teacher_on_its_head(
    cache: str, digits_shards: str, digits_val_shards: str, tmp_path: Path, distillation: str, tau: float
) -> None:
    cfg = resnet_config(
        digits_shards,
        cache,
        tmp_path / "run",
        distillation=distillation,
        tau=tau,
        alpha=0.7,
        val_shards=[digits_val_shards],
    )
    result = train(cfg)
    lines = read_metrics(cfg.out)
    steps = [m for m in lines if m["event"] == "train"]
    assert len(steps) == 120 // 8
    for m in steps:  # one head, both terms: DeiT's combination with alpha
        assert m["distill_loss"] > 0 and m["base_loss"] > 0
        assert m["loss"] == pytest.approx(0.3 * m["base_loss"] + 0.7 * m["distill_loss"], rel=1e-5)
    epoch = next(m for m in lines if m["event"] == "epoch")
    assert epoch["heads"] == 1 and 0 <= epoch["top1_avg"] <= epoch["top5_avg"] <= 100
    assert "top1_dist" not in epoch and result["best_top1"] == epoch["top1_avg"]


def test_last_batch_of_one_sample_trains_with_running_statistics(
    cache: str, digits_shards: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """120 copies in batches of 17: seven full batches, then one of a single sample."""
    cfg = resnet_config(digits_shards, cache, tmp_path / "run", batch_size=17, distillation="hard")
    with caplog.at_level(logging.WARNING, logger="pipeline.models.task"):
        train(cfg)
    single = [r.getMessage() for r in caplog.records if "training batch of 1 sample" in r.getMessage()]
    assert len(single) == 1 and "(1 such batch(es) so far)" in single[0], single
    epoch = next(m for m in read_metrics(cfg.out) if m["event"] == "epoch")
    assert epoch["steps"] == 8 and epoch["copies"]["planned"] == 120
    weights = torch.load(Path(cfg.out) / "last.pth", weights_only=True)["model"]
    tracked = {k: int(v) for k, v in weights.items() if k.endswith("num_batches_tracked")}
    assert tracked and set(tracked.values()) == {7}, "the batch of one left every running statistic alone"


def test_evaluate_reports_the_one_head(cache: str, digits_shards: str, digits_val_shards: str, tmp_path: Path) -> None:
    cfg = resnet_config(digits_shards, cache, tmp_path / "run", val_shards=[digits_val_shards])
    train(cfg)
    best = Path(cfg.out) / "best.pth"
    proc = subprocess.run(
        [*stillroom_cmd(), "evaluate", "--checkpoint", str(best), "--shards", digits_val_shards, "--workers", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert {k: report[k] for k in ("model", "heads", "samples")} == {"model": RESNET, "heads": 1, "samples": 60}
    assert not [k for k in report if k.endswith(("_avg", "_cls", "_dist"))], report
    epoch = next(m for m in read_metrics(cfg.out) if m["event"] == "epoch")
    assert (report["top1"], report["top5"]) == (epoch["top1_avg"], epoch["top5_avg"])

    # timm's own forward of the saved weights, on the evaluation views.
    state = torch.load(best, weights_only=True)
    meta = state["model_meta"]
    model = timm.create_model(RESNET, num_classes=10, **meta["kwargs"])
    model.load_state_dict(state["model"])
    model.eval()
    mean, std = torch.tensor(meta["mean"]).view(1, 3, 1, 1), torch.tensor(meta["std"]).view(1, 3, 1, 1)
    pixels, labels = [], []
    for i, shard in enumerate(load_shard_list(digits_val_shards)):
        for s in iter_decoded(shard, i, 10):
            pixels.append(model_input(eval_view(s.image, eval_recipe(32))))
            labels.append(s.label)
    with torch.no_grad():
        top5 = model((torch.stack(pixels) - mean) / std).topk(5, dim=1).indices
    y = torch.tensor(labels)
    assert report["top1"] == round(100.0 * float((top5[:, 0] == y).sum()) / 60, 3)
    assert report["top5"] == round(100.0 * float((top5 == y[:, None]).any(1).sum()) / 60, 3)


def test_a_model_without_stochastic_depth_is_refused_in_one_line() -> None:
    from pipeline.errors import ConfigError
    from pipeline.models.build import create

    with pytest.raises(ConfigError, match=r"'vgg11' takes no argument 'drop_path_rate': .* --drop-path 0"):
        create("vgg11", 10, drop_path_rate=0.1)
    with pytest.raises(ConfigError, match=r"'resnet10t' takes no argument 'widths'"):
        create(RESNET, 10, widths=[1, 2])
