"""Phase 2 (train-student) on 32 px digits with a tiny cache: the cached/live equivalence, exact
resume (epoch boundary and SIGKILL mid-epoch), refusals before training, and evaluation."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from conftest import (
    ROOT,
    TINY_STUDENT,
    child_env,
    student_config,
    tiny_cache_config,
    train_killed_at,
    write_digits_shards,
)

from pipeline.cache import open_cache
from pipeline.errors import CacheError, ConfigError
from pipeline.models.build import Normalized, create, model_stats
from pipeline.models.targets import Reduction, soft_target_probs
from pipeline.models.task import DistillationTask
from pipeline.models.teacher import load_teacher
from pipeline.phase1.cache_teacher import run as cache_teacher
from pipeline.phase2.lanes import StreamSpec, epoch_batches
from pipeline.phase2.train import train
from pipeline.seeding import stable_seed
from pipeline.shards.decode import iter_decoded
from pipeline.shards.lists import load_shard_list
from pipeline.train_options import TrainConfig
from pipeline.views import deal as dl
from pipeline.views.augment import eval_view
from pipeline.views.pixels import model_input
from pipeline.views.plans import epoch_plan
from pipeline.views.recipe import eval_recipe, make_recipe

STUDENT = "deit_tiny_distilled_patch16_224"
STILLROOM = str(ROOT / ".venv" / "bin" / "stillroom")
# Two blocks, so drop path (0.1 on the second block) draws from the global torch RNG: resume must restore it.
RESUME_STUDENT = {**TINY_STUDENT, "depth": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


def build_cache(shards: str, teacher: str, out: Path, **kw) -> str:
    cache_teacher(tiny_cache_config(shards, teacher, out, **{"views": 2, "view_block": 1, "batch_size": 64, **kw}))
    return str(out)


@pytest.fixture(scope="module")
def cache(digits_shards: str, tiny_teacher: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Both views (0, 1) of the 3 digits shards, K=5, tau in {1, 3}, DeiT recipe at 32 px (with mixing)."""
    return build_cache(digits_shards, tiny_teacher, tmp_path_factory.mktemp("cache") / "cache.zarr")


def student_cfg(shards: str, cache: str | None, out: Path, **kw) -> TrainConfig:
    return student_config(shards, cache, out, **kw)


def read_metrics(out: str | Path) -> list[dict]:
    with open(Path(out) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"tensors differ: {differing[:5]}"


# ------------------------------------------------------------------------------------------
# Cached mode vs live-teacher mode


def test_cached_and_live_teacher_give_the_same_loss(cache: str, digits_shards: str, tiny_teacher: str) -> None:
    """On one replayed batch (view 1, mixed pixels), the cached targets reproduce the live teacher's loss."""
    c = open_cache(cache)
    recipe = make_recipe(c.meta.recipe)
    shards = load_shard_list(digits_shards)
    plan = epoch_plan(1, 1, 2)
    spec = StreamSpec(
        shards=shards,
        lanes=[dl.deal(shards, plan, 0, 1).segments(0)],
        starts=[],
        plan=plan,
        recipe=recipe,
        seed=0,
        num_classes=10,
        caches=[cache],
        presence=cache,
        cache_shards=[0, 1, 2],
        lse_columns=[[0, 1]],  # logsumexp at tau 1 and 3
    )
    batch = next(iter(epoch_batches(spec, 16, 64, seed=3)))
    assert {"t_values", "t_indices", "t_lse"} <= batch.keys()
    assert (batch["lam"] < 1).any(), "the batch should hold mixed views"

    teacher_net = load_teacher("regnetx_002", 10, tiny_teacher, torch.device("cpu"))[0].net
    teacher = Normalized(teacher_net, *model_stats(teacher_net)).eval()
    torch.manual_seed(0)
    net = create(STUDENT, 10, **TINY_STUDENT)
    net.set_distilled_training(True)
    student = Normalized(net, *model_stats(net)).train()  # no dropout / drop path: deterministic forward

    # Independently: the teacher's full softmax on the very pixels of the batch.
    mean, std = (torch.tensor(teacher_net.pretrained_cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        live_logits = teacher_net((model_input(batch["pixels"]) - mean) / std)
    values, indices, lse = batch["t_values"][:, 0], batch["t_indices"][:, 0], batch["t_lse"][:, 0]
    assert torch.equal(indices[:, 0], live_logits.argmax(dim=1))
    # the cache keeps log-probabilities at its first temperature (1), in float16
    logp = F.log_softmax(live_logits, dim=1).gather(1, indices)
    torch.testing.assert_close(values, logp, rtol=2e-3, atol=2e-3)

    for col, tau in enumerate((1.0, 3.0)):
        probs = soft_target_probs(values, indices, lse[:, 0], lse[:, col], 1.0, tau, 10)
        exact = F.softmax(live_logits / tau, dim=1)
        torch.testing.assert_close(probs.gather(1, indices), exact.gather(1, indices), rtol=2e-3, atol=1e-4)
        torch.testing.assert_close(probs.sum(dim=1), torch.ones(16), rtol=0, atol=1e-5)

    for distillation, tau in (("hard", 1.0), ("soft", 1.0), ("soft", 3.0)):
        kw = {"distillation": distillation, "alpha": 0.5, "tau": tau, "reductions": [Reduction(5, (1.0, 3.0))]}
        at_tau = {**batch, "t_lse": batch["t_lse"][:, :, [0, [1.0, 3.0].index(tau)]]}
        cached = DistillationTask(student=student, num_classes=10, **kw)(at_tau)
        live = DistillationTask(student=student, num_classes=10, teachers=[teacher], **kw)(batch)
        assert float(cached.base_loss) == float(live.base_loss)
        if distillation == "hard":
            assert float(cached.distill_loss) == float(live.distill_loss)
            assert torch.equal(cached.loss, live.loss)
        else:  # the same reduction, float16 included: equal up to the teacher's forward on another batch
            assert float(cached.distill_loss) == pytest.approx(float(live.distill_loss), rel=2e-3, abs=1e-5)
            torch.testing.assert_close(cached.loss, live.loss, rtol=2e-3, atol=1e-5)


def _train_cached_and_live(cache: str, shards: str, teacher: str, tmp_path: Path, **kw) -> dict[str, str]:
    """The same one-epoch run with cached targets and with the live teacher; returns each run's folder."""
    outs = {}
    for mode in ("cached", "live"):
        cfg = student_cfg(shards, cache, tmp_path / mode, epochs=1, teacher_mode=mode, teacher_checkpoint=teacher, **kw)
        train(cfg)
        outs[mode] = cfg.out
    return outs


def test_train_student_live_mode_matches_cached_mode(
    cache: str, digits_shards: str, tiny_teacher: str, tmp_path: Path
) -> None:
    """End to end through train(): same init, same first batch, so the first step's losses agree."""
    outs = _train_cached_and_live(
        cache, digits_shards, tiny_teacher, tmp_path, max_steps_per_epoch=1, distillation="soft", tau=3.0
    )
    first = {mode: next(m for m in read_metrics(out) if m["event"] == "train") for mode, out in outs.items()}
    assert first["cached"]["base_loss"] == first["live"]["base_loss"]
    assert first["cached"]["distill_loss"] == pytest.approx(first["live"]["distill_loss"], rel=2e-3, abs=1e-5)
    assert first["cached"]["loss"] == pytest.approx(first["live"]["loss"], rel=2e-3, abs=1e-5)


def test_hard_distillation_trains_identically_from_cache_and_live_teacher(
    cache: str, digits_shards: str, tiny_teacher: str, tmp_path: Path
) -> None:
    """Hard targets are the teacher's argmax, exact in the cache: several steps with drop path on
    (global-RNG noise) must leave bit-identical weights whether the teacher is cached or live."""
    outs = _train_cached_and_live(
        cache,
        digits_shards,
        tiny_teacher,
        tmp_path,
        max_steps_per_epoch=3,
        distillation="hard",
        drop_path=0.2,  # timm spreads it linearly over depth: block 1 of 2 gets all of it
        model_kwargs={**TINY_STUDENT, "depth": 2},
    )
    weights = {mode: torch.load(Path(out) / "last.pth", weights_only=True)["model"] for mode, out in outs.items()}
    assert_same_weights(weights["cached"], weights["live"])


def test_repeated_augmentation_trains_identically_from_cache_and_live_teacher(
    digits_shards: str, tiny_teacher: str, tmp_path: Path
) -> None:
    """R = 3 (each trained sample 3 times per epoch, partners within its group): the cached targets of
    every copy are the live teacher's on the very same pixels, so the weights are bit-identical."""
    cache = build_cache(digits_shards, tiny_teacher, tmp_path / "ra.zarr", views=3, view_block=3, repeats=3)
    outs = _train_cached_and_live(
        cache,
        digits_shards,
        tiny_teacher,
        tmp_path,
        max_steps_per_epoch=4,
        distillation="hard",
        drop_path=0.2,
        model_kwargs={**TINY_STUDENT, "depth": 2},
    )
    weights = {mode: torch.load(Path(out) / "last.pth", weights_only=True)["model"] for mode, out in outs.items()}
    assert_same_weights(weights["cached"], weights["live"])
    epoch = next(m for m in read_metrics(outs["cached"]) if m["event"] == "epoch")
    assert epoch["views"] == [0, 1, 2] and epoch["steps"] == 4


# ------------------------------------------------------------------------------------------
# Resume determinism


@pytest.fixture(scope="module")
def reference_run(cache: str, digits_shards: str, digits_val_shards: str, tmp_path_factory) -> TrainConfig:
    """Two epochs uninterrupted (warmup then cosine, drop path on, evaluation after each epoch)."""
    out = tmp_path_factory.mktemp("reference")
    cfg = student_cfg(digits_shards, cache, out, val_shards=digits_val_shards, model_kwargs=dict(RESUME_STUDENT))
    train(cfg)
    return cfg


def test_resume_at_epoch_boundary_is_exact(reference_run: TrainConfig, tmp_path: Path) -> None:
    """1 epoch (epochs=1), then --resume --allow-change epochs with epochs=2 == 2 epochs uninterrupted, bit for bit.

    The warmup covers epoch 0, so the first leg's schedule is the same as the reference's; the
    resumed leg must follow the schedule of the new --epochs, not the one stored in the checkpoint.
    Without --allow-change the longer --epochs is refused, naming both values.
    """
    cfg = dataclasses.replace(reference_run, out=str(tmp_path / "b"))
    train(dataclasses.replace(cfg, epochs=1))
    first = torch.load(tmp_path / "b" / "last.pth", weights_only=True)
    assert first["epoch"] == 1 and first["step_in_epoch"] == 0
    with pytest.raises(ConfigError, match=r"--epochs 1, now 2: .* add --allow-change epochs"):
        train(dataclasses.replace(cfg, resume=True))
    train(dataclasses.replace(cfg, resume=True, allow_change=["epochs"]))

    ref = torch.load(Path(reference_run.out) / "last.pth", weights_only=True)
    got = torch.load(tmp_path / "b" / "last.pth", weights_only=True)
    assert got["epoch"] == ref["epoch"] == 2 and got["global_step"] == ref["global_step"] == 30
    assert_same_weights(ref["model"], got["model"])
    ref_lr = [m["lr"] for m in read_metrics(reference_run.out) if m["event"] == "train" and m["epoch"] == 1]
    got_lr = [m["lr"] for m in read_metrics(tmp_path / "b") if m["event"] == "train" and m["epoch"] == 1]
    assert got_lr == ref_lr and len(set(got_lr)) == 15  # cosine over 2 epochs, not the 1-epoch run's min_lr
    for opt_ref, opt_got in zip(ref["optimizer"]["state"].values(), got["optimizer"]["state"].values(), strict=True):
        assert_same_weights(opt_ref, opt_got)


def test_sigkill_mid_epoch_then_resume_is_exact(reference_run: TrainConfig, tmp_path: Path) -> None:
    """checkpoint_every=4; SIGKILL at step 10 of epoch 1 (last checkpoint: step 8); --resume == uninterrupted."""
    cfg = dataclasses.replace(reference_run, out=str(tmp_path / "run"), checkpoint_every=4)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    proc = train_killed_at(path, 15 + 1 + 10 + 1, timeout=300)  # 15 steps, the epoch's end, 10 steps
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    mid = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert (mid["epoch"], mid["step_in_epoch"], mid["global_step"]) == (1, 8, 23)
    assert not list((tmp_path / "run").glob("*.tmp-*")), "a half-written checkpoint was left behind"

    train(dataclasses.replace(cfg, resume=True))
    start = [m for m in read_metrics(tmp_path / "run") if m["event"] == "start"]
    assert [(m["first_epoch"], m["start_step"]) for m in start] == [(0, 0), (1, 8)]
    ref = torch.load(Path(reference_run.out) / "last.pth", weights_only=True)
    got = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert (got["epoch"], got["step_in_epoch"], got["global_step"]) == (2, 0, 30)
    assert_same_weights(ref["model"], got["model"])
    # Every checkpoint this project writes loads with weights_only=True (no pickled objects).
    for name in ("last.pth", "best.pth"):
        state = torch.load(tmp_path / "run" / name, weights_only=True)
        assert {"model", "optimizer", "identity", "config", "model_meta", "epoch", "global_step"} <= state.keys()


# ------------------------------------------------------------------------------------------
# Refusals before training starts


def _assert_nothing_trained(out: Path) -> None:
    assert not (out / "last.pth").exists()
    assert not (out / "metrics.jsonl").exists()


def test_incomplete_cache_names_the_missing_units(digits_shards: str, tiny_teacher: str, tmp_path: Path) -> None:
    partial = build_cache(digits_shards, tiny_teacher, tmp_path / "partial.zarr", view_range="0:1")
    cfg = student_cfg(digits_shards, partial, tmp_path / "run", epochs=2)
    with pytest.raises(CacheError, match="incomplete") as err:
        train(cfg)
    msg = str(err.value)
    assert "3 unit(s)" in msg
    for name in ("train-000000.tar", "train-000001.tar", "train-000002.tar"):
        assert f"views 1-1 of shard {name!r}" in msg
    _assert_nothing_trained(tmp_path / "run")
    # One epoch needs view 0 only, which is complete: that run is allowed.
    assert train(dataclasses.replace(cfg, epochs=1, max_steps_per_epoch=1))["steps"] == 1


def test_cache_of_another_seed_is_refused_by_the_cli(cache: str, digits_shards: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            STILLROOM,
            "train-student",
            "--shards",
            digits_shards,
            "--cache",
            cache,
            "--seed",
            "1",
            "--out",
            str(out),
            "--epochs",
            "1",
            "--progress",
            "off",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env(),
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "does not match this training run" in proc.stderr and "seed: cache has 0, requested 1" in proc.stderr
    assert not (out / "last.pth").exists()


def test_cache_of_another_recipe_is_refused(cache: str, digits_shards: str, tmp_path: Path) -> None:
    recipe = {**open_cache(cache).meta.recipe, "reprob": 0.0}
    with pytest.raises(CacheError, match=r"recipe\.reprob: cache has 0\.25, requested 0\.0"):
        train(student_cfg(digits_shards, cache, tmp_path / "run", recipe=recipe))
    _assert_nothing_trained(tmp_path / "run")


def test_cache_of_other_shards_is_refused(cache: str, digits_val_shards: str, tmp_path: Path) -> None:
    with pytest.raises(CacheError, match=r"shard 'val-000000\.tar' .* is not in cache"):
        train(student_cfg(digits_val_shards, cache, tmp_path / "run"))
    _assert_nothing_trained(tmp_path / "run")


def test_same_named_shards_with_other_samples_are_refused(cache: str, tmp_path: Path) -> None:
    """Shards named like the cached ones but holding other images fail the per-row key check at the
    first batch, before any optimizer step."""
    other = write_digits_shards(tmp_path / "other", 120, 40, offset=500)
    with pytest.raises(CacheError, match=r"train-00000\d\.tar.* position \d+: cache .* row holds key"):
        train(student_cfg(other, cache, tmp_path / "run"))
    assert not (tmp_path / "run" / "last.pth").exists()
    assert [m["event"] for m in read_metrics(tmp_path / "run")] == ["start"]


def test_uncached_tau_is_refused(cache: str, digits_shards: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--tau 2\.0 is not a cached temperature of cache .* \(\[1\.0, 3\.0\]\)"):
        train(student_cfg(digits_shards, cache, tmp_path / "run", distillation="soft", tau=2.0))
    _assert_nothing_trained(tmp_path / "run")


# ------------------------------------------------------------------------------------------
# Evaluation


def test_evaluate_reports_top1_top5_of_each_head(reference_run: TrainConfig, digits_val_shards: str) -> None:
    best = Path(reference_run.out) / "best.pth"
    proc = subprocess.run(
        [STILLROOM, "evaluate", "--checkpoint", str(best), "--shards", digits_val_shards, "--workers", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["samples"] == 60
    for head in ("cls", "dist", "avg"):
        assert 0 <= report[f"top1_{head}"] <= report[f"top5_{head}"] <= 100

    # Same numbers as the evaluation that made this checkpoint the best one during training.
    state = torch.load(best, weights_only=True)
    epochs = [m for m in read_metrics(reference_run.out) if m["event"] == "epoch"]
    at_save = next(m for m in epochs if m["epoch"] == state["epoch"] - 1)
    tops = [k for k in report if k.startswith("top")]
    assert len(tops) == 6 and {k: report[k] for k in tops} == {k: at_save[k] for k in tops}

    # And the same numbers from timm's own heads on independently loaded weights.
    meta = state["model_meta"]
    model = timm.create_model(meta["name"], num_classes=10, **meta["kwargs"])
    model.load_state_dict(state["model"])
    model.eval()
    recipe = eval_recipe(32)
    mean, std = torch.tensor(meta["mean"]).view(1, 3, 1, 1), torch.tensor(meta["std"]).view(1, 3, 1, 1)
    pixels, labels = [], []
    for i, shard in enumerate(load_shard_list(digits_val_shards)):
        for s in iter_decoded(shard, i, 10):
            pixels.append(model_input(eval_view(s.image, recipe)))
            labels.append(s.label)
    x, y = (torch.stack(pixels) - mean) / std, torch.tensor(labels)
    with torch.no_grad():
        avg = model(x)  # timm: eval-mode distilled forward averages the two heads
        model.set_distilled_training(True)
        model.training = True  # only forward_head's branch; the blocks stay in eval mode
        cls, dist = model.forward_head(model.forward_features(x))
    for head, out in (("cls", cls), ("dist", dist), ("avg", avg)):
        top5 = out.topk(5, dim=1).indices
        assert report[f"top1_{head}"] == round(100.0 * float((top5[:, 0] == y).sum()) / 60, 3)
        assert report[f"top5_{head}"] == round(100.0 * float((top5 == y[:, None]).any(1).sum()) / 60, 3)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile's CPU backend needs a C++ compiler")
def test_compile_trains_the_student(digits_shards: str, cache: str, tmp_path: Path) -> None:
    """--compile (torch.compile of the student, as timm's --torchcompile) trains, and its checkpoint holds the
    plain module's weights (no ``_orig_mod.`` prefix), so evaluate and a resume read it as any other."""
    cfg = student_config(digits_shards, cache, tmp_path / "run", epochs=1, max_steps_per_epoch=2)
    result = train(dataclasses.replace(cfg, compile=True, deterministic=False))
    assert result["steps"] == 2 and math.isfinite(result["train_loss"])
    state = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert not any(k.startswith("_orig_mod.") for k in state["model"])
    torch.manual_seed(stable_seed("init", 0))  # the trainer's initial weights
    initial = create(STUDENT, 10, **TINY_STUDENT, drop_path_rate=cfg.drop_path).state_dict()
    assert any(not torch.equal(state["model"][k], initial[k]) for k in initial), "two steps moved the weights"
