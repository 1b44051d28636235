"""A resume continues the very same run, or is refused in one line naming what differs, and a refused
resume leaves OUT byte for byte as it was (issue: nothing wrong passes silently, round two)."""

from __future__ import annotations

import dataclasses
import errno
from pathlib import Path

import pytest
import torch
from conftest import TINY_STUDENT, student_config, tiny_cache_config

from pipeline.errors import CheckpointError, ConfigError
from pipeline.phase1.cache_teacher import run as cache_teacher
from pipeline.phase2 import checkpoint as ckpt_mod
from pipeline.phase2.train import train

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
    cfg = student_config(shards, cache, out, epochs=2, checkpoint_every=4, max_steps_per_epoch=6, **kw)
    train(dataclasses.replace(cfg, epochs=1))
    state = torch.load(out / "last.pth", weights_only=True)
    state.update(epoch=0, step_in_epoch=4)
    torch.save(state, out / "last.pth")
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
        ("other teacher's cache", "caches"),
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
