"""A resume continues the very same run, or is refused in one line naming what differs, and a refused
resume leaves OUT byte for byte as it was (issue: nothing wrong passes silently, rounds two and three).

Every train-student option declares what a new value does on --resume; one that changes what is trained is
refused (mid-epoch or at an epoch end) unless --allow-change names it, then logged in metrics.jsonl and
recorded in the checkpoint."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_STUDENT, student_config, tiny_cache_config

from pipeline.config import checked
from pipeline.errors import CheckpointError, ConfigError
from pipeline.interrupt import RunInterrupted
from pipeline.phase1.cache_teacher import run as cache_teacher
from pipeline.phase2 import checkpoint as ckpt_mod
from pipeline.phase2.identity import recorded_options
from pipeline.phase2.train import train
from pipeline.train_options import ROLES, TRAINING, TrainConfig, resume_role

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def caches(digits_shards: str, tiny_teacher: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One cache, and one over the same views by another teacher (the same net at other weights)."""
    folder = tmp_path_factory.mktemp("caches")
    other = folder / "other.pth"
    weights = torch.load(tiny_teacher, weights_only=True)
    torch.save({k: v * 1.01 if v.is_floating_point() else v for k, v in weights.items()}, other)
    out = {}
    for name, teacher in (("a", tiny_teacher), ("b", str(other))):
        out[name] = str(folder / f"{name}.zarr")
        cache_teacher(tiny_cache_config(digits_shards, teacher, Path(out[name]), views=2, view_block=1))
    return out


def files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def stopped_mid_epoch(shards: str, cache: str, out: Path, **kw) -> dataclasses.dataclass:
    """A run whose last.pth was taken mid-epoch (step 4 of epoch 0), as a preempted job leaves it."""
    cfg = student_config(shards, cache, out, epochs=2, max_steps_per_epoch=6, **kw)
    with pytest.MonkeyPatch.context() as mp, pytest.raises(RunInterrupted):
        mp.setenv("STILLROOM_DEBUG_STOP_AT_STEP", "4")  # as if SIGTERM came at step 4
        train(cfg)
    return dataclasses.replace(cfg, resume=True)


def test_resume_without_last_pth_is_refused_and_out_untouched(caches, digits_shards, tmp_path):
    cfg = student_config(digits_shards, caches["a"], tmp_path / "run", epochs=1, max_steps_per_epoch=2)
    cfg = dataclasses.replace(cfg, val_shards=[digits_shards], eval_every=1)
    train(cfg)
    (tmp_path / "run" / "last.pth").unlink()
    before = files(tmp_path / "run")
    assert {"best.pth", "metrics.jsonl", "resolved-config.yaml"} <= before.keys()
    with pytest.raises(ConfigError, match=r"--resume: .*last\.pth does not exist, but --out holds a run"):
        train(dataclasses.replace(cfg, resume=True))
    assert files(tmp_path / "run") == before


@pytest.mark.parametrize(
    "change, field",
    [
        ("shard order", "shards"),
        ("other teacher's cache", "cache"),
        ("other model", "model"),
        ("other model kwargs", "model_kwargs"),
    ],
)
def test_a_resume_of_another_run_is_refused_naming_the_field(caches, digits_shards, tmp_path, change, field):
    cfg = stopped_mid_epoch(digits_shards, caches["a"], tmp_path / "run")
    before = files(tmp_path / "run")
    if change == "shard order":
        folder = Path(digits_shards).parent
        other = dataclasses.replace(cfg, shards=[str(folder / f"train-00000{i}.tar") for i in (2, 0, 1)])
    elif change == "other teacher's cache":
        other = dataclasses.replace(cfg, cache=[caches["b"]])
    elif change == "other model":
        other = dataclasses.replace(cfg, model="deit_tiny_patch16_224")
    else:
        other = dataclasses.replace(cfg, model_kwargs={**TINY_STUDENT, "depth": 2})
    with pytest.raises(ConfigError, match=rf"--resume: .*last\.pth belongs to another run: {field}: "):
        train(other)
    assert files(tmp_path / "run") == before, "a refused resume writes nothing"
    assert train(cfg)["epoch"] == 1, "the same run still resumes"


def test_a_full_disk_is_one_line_naming_the_checkpoint_and_the_space(caches, digits_shards, tmp_path, monkeypatch):
    cfg = student_config(digits_shards, caches["a"], tmp_path / "run", epochs=1, max_steps_per_epoch=2)

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1088 vs 1012")

    monkeypatch.setattr(ckpt_mod.torch, "save", full)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint '.*last\.pth': no space left on the device \("):
        train(cfg)

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", enospc)
    with pytest.raises(CheckpointError, match=r"no space left on the device \([\d,.]+ MB free on .*\)") as e:
        train(dataclasses.replace(cfg, force_new=True))
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "run").glob("*.tmp-*")), "no half-written temp file is left behind"


# ---------------------------------------------------------------------------------------------------------
# Round three: every option that changes what is trained is part of the run (or changes with --allow-change)


def test_every_train_option_declares_its_role_on_resume() -> None:
    """One declaration per option says what a new value does on --resume; an option without one is an error."""
    undeclared = [f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("on_resume") not in ROLES]
    assert undeclared == [], f"declare on_resume=RUN/TRAINING/STREAM/FREE for {undeclared}"
    recorded = set(recorded_options())
    for name in ("lr", "min_lr", "warmup_lr", "warmup_epochs", "weight_decay", "clip_grad", "accum_steps", "epochs"):
        assert name in recorded or resume_role(name) == "stream", name
    for name in ("alpha", "tau", "distillation", "teacher_weights", "drop_path", "model_ema", "model_ema_decay"):
        assert name in recorded, name
    for name in ("workers", "progress", "log_every", "out", "log_to", "eval_every"):
        assert name not in recorded, name
    lr = TrainConfig.__dataclass_fields__["lr"]
    declared, lr.metadata = lr.metadata, {**lr.metadata, "on_resume": None}  # a new option that declares none
    try:
        with pytest.raises(TypeError, match="'lr' declares no on_resume role"):
            recorded_options()
    finally:
        lr.metadata = declared


@pytest.fixture(scope="module")
def stopped_run(caches, digits_shards, tmp_path_factory) -> tuple[TrainConfig, Path]:
    """A run stopped mid-epoch (epoch 0, step 4), made once; tests copy its folder."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    return stopped_mid_epoch(digits_shards, caches["a"], out, model_ema_decay=1.0), out


def copy_of(stopped_run, tmp_path: Path, at_epoch_end: bool = False) -> TrainConfig:
    cfg, folder = stopped_run
    shutil.copytree(folder, tmp_path / "run")
    if at_epoch_end:
        state = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
        state.update(epoch=1, step_in_epoch=0)
        torch.save(state, tmp_path / "run" / "last.pth")
    return dataclasses.replace(cfg, out=str(tmp_path / "run"))


CHANGES = {
    "lr": 20.0,  # x100
    "alpha": 0.9,
    "weight_decay": 0.5,
    "drop_path": 0.3,
    "warmup_epochs": 0,
    "min_lr": 1e-3,
    "clip_grad": 1.0,
    "model_ema": True,
    "epochs": 3,
}


@pytest.mark.parametrize("at_epoch_end", [False, True], ids=["mid-epoch", "epoch-end"])
@pytest.mark.parametrize("field", list(CHANGES))
def test_a_changed_training_option_is_refused_naming_it_and_both_values(stopped_run, tmp_path, field, at_epoch_end):
    cfg = copy_of(stopped_run, tmp_path, at_epoch_end)
    before, now = getattr(cfg, field), CHANGES[field]
    files_before = files(tmp_path / "run")
    flag = "--" + field.replace("_", "-")
    with pytest.raises(ConfigError, match=rf"{flag} {before!r}, now {now!r}: .*--allow-change {field}") as e:
        train(dataclasses.replace(cfg, **{field: now}))
    assert "\n" not in str(e.value)
    assert files(tmp_path / "run") == files_before, "a refused resume writes nothing"


def test_allow_change_continues_with_the_new_value_logs_and_records_it(stopped_run, tmp_path):
    cfg = copy_of(stopped_run, tmp_path)
    changed = dataclasses.replace(cfg, lr=0.02, weight_decay=0.5, allow_change=["lr", "weight-decay"])
    train(changed)
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {e["field"]: (e["before"], e["now"], e["epoch"], e["step"]) for e in events if e["event"] == "changed"}
    assert logged == {"lr": (0.2, 0.02, 0, 4), "weight_decay": (0.05, 0.5, 0, 4)}
    state = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert state["identity"]["lr"] == 0.02 and state["identity"]["weight_decay"] == 0.5, "recorded from then on"
    assert [c["field"] for c in state["changes"]] == ["lr", "weight_decay"]
    decays = {g["weight_decay"] for g in state["optimizer"]["param_groups"]}
    assert decays == {0.0, 0.5}, f"the new weight decay is the one applied, not the checkpoint's: {decays}"
    # From now on the new values are the run's: the old ones are the change.
    more = dataclasses.replace(changed, epochs=3, allow_change=["epochs"])
    assert train(more)["epoch"] == 2
    with pytest.raises(ConfigError, match=r"--lr 0\.02, now 0\.2"):
        train(dataclasses.replace(cfg, epochs=3))


def test_model_ema_turned_on_at_resume_starts_from_the_resumed_weights(stopped_run, tmp_path):
    """decay 1.0: the average never moves, so it must equal the weights it started from: the resumed ones."""
    cfg = copy_of(stopped_run, tmp_path)
    resumed = torch.load(tmp_path / "run" / "last.pth", weights_only=True)["model"]
    train(dataclasses.replace(cfg, model_ema=True, allow_change=["model_ema"]))
    ema = torch.load(tmp_path / "run" / "last.pth", weights_only=True)["ema"]
    worst = max((ema[k].float() - resumed[k].float()).abs().max().item() for k in resumed)
    assert worst == 0.0, f"the EMA did not start from the resumed weights (max |ema - resumed| {worst})"


def test_allow_change_takes_only_options_that_may_change(stopped_run, tmp_path):
    cfg = copy_of(stopped_run, tmp_path)
    for name, why in [
        ("lrr", "there is no such option"),
        ("shards", "is what the run is"),
        ("batch_size", "which samples each step holds"),
        ("log_every", "changes no weight"),
    ]:
        with pytest.raises(ConfigError, match=rf"--allow-change {name}: .*{why}.*options it takes: .*\blr\b"):
            checked(dataclasses.replace(cfg, allow_change=[name]))
    with pytest.raises(ConfigError, match="--allow-change applies to --resume only"):
        checked(dataclasses.replace(cfg, resume=False, allow_change=["lr"]))
    assert checked(dataclasses.replace(cfg, allow_change=["lr,warmup-epochs"])).allow_change == ["lr", "warmup_epochs"]
    assert all(resume_role(n) == TRAINING for n in ("lr", "warmup_epochs"))


def test_a_checkpoint_that_predates_an_option_is_checked_against_its_config(stopped_run, tmp_path, caplog):
    """Round two recorded fewer options (and the caches as "caches"): the rest come from its saved config; an
    option newer than the checkpoint is taken at its default, with a warning."""
    cfg = copy_of(stopped_run, tmp_path)
    path = tmp_path / "run" / "last.pth"
    state = torch.load(path, weights_only=True)
    old = (
        "shards",
        "cache",
        "model",
        "model_kwargs",
        "num_classes",
        "recipe",
        "seed",
        "repeats",
        "run_seed",
        "teacher_weights",
    )
    state["identity"] = {("caches" if k == "cache" else k): state["identity"][k] for k in (*old, "distillation")}
    del state["config"]["alpha"]  # an option the stillroom that wrote it did not have
    state.pop("changes")
    torch.save(state, path)
    with pytest.raises(ConfigError, match=r"--lr 0\.2, now 2\.0: "):
        train(dataclasses.replace(cfg, lr=2.0))
    with pytest.raises(ConfigError, match=r"--alpha 0\.5, now 0\.7: "):
        train(dataclasses.replace(cfg, alpha=0.7))
    with caplog.at_level(logging.WARNING):
        assert train(cfg)["epoch"] == 1
    assert "predates options alpha: its run had their defaults" in caplog.text
