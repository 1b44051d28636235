"""train-student never loses or silently changes a run (issue: nothing wrong passes silently).

* an existing run is never overwritten without --resume; --force-new moves it aside;
* a resume that would skip or repeat samples (another batch size mid-epoch, another global batch) is
  refused naming the option; checkpoints are never taken mid-accumulation, and a SIGKILL + resume with
  gradient accumulation gives the uninterrupted run's weights bit for bit;
* the epoch is saved before evaluation runs, and --on-error skip reaches the validation shards;
* expected failures are one line naming the file or option, before any training;
* SIGINT or SIGTERM at any moment, even while loader workers start, stops the run with a loadable
  checkpoint of its exact position and a non-zero status.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    ROOT,
    TINY_STUDENT,
    child_env,
    stillroom_cmd,
    student_config,
    tiny_cache_config,
    train_killed_at,
    write_digits_shards,
)
from typer.testing import CliRunner

from cli.main import app
from pipeline.errors import ConfigError
from pipeline.phase1.cache_teacher import run as cache_teacher
from pipeline.phase2 import train as train_mod
from pipeline.phase2.train import train
from pipeline.train_options import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(digits_shards: str, tiny_teacher: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("cache") / "cache.zarr"
    cache_teacher(tiny_cache_config(digits_shards, tiny_teacher, out, views=2, view_block=1, batch_size=64))
    return str(out)


def cfg_for(shards: str, cache: str, out: Path, **kw) -> TrainConfig:
    """The suite's tiny student with two blocks, so drop path draws from the global RNG (resume must restore it)."""
    return student_config(shards, cache, out, **{"model_kwargs": {**TINY_STUDENT, "depth": 2}, **kw})


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def test_an_existing_run_is_never_overwritten(cache: str, digits_shards: str, tmp_path: Path) -> None:
    cfg = cfg_for(digits_shards, cache, tmp_path / "run", epochs=1, max_steps_per_epoch=2)
    train(cfg)
    before = files(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"already holds a run .*--resume.*--force-new"):
        train(cfg)
    assert files(tmp_path / "run") == before, "a refused run must not touch the previous one"
    train(dataclasses.replace(cfg, force_new=True))
    aside = [p for p in (tmp_path / "run").iterdir() if p.is_dir() and p.name.startswith("replaced-")]
    assert len(aside) == 1 and files(aside[0])["last.pth"] == before["last.pth"], "moved aside, not deleted"
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert sum('"event": "start"' in line for line in metrics) == 1, "a new run, not a second run appended"


def test_resume_with_other_batch_geometry_is_refused(cache: str, digits_shards: str, tmp_path: Path) -> None:
    cfg = cfg_for(digits_shards, cache, tmp_path / "run", epochs=1, checkpoint_every=4, max_steps_per_epoch=6)
    train(cfg)  # ends at an epoch boundary; make a mid-epoch checkpoint by hand from the same run
    state = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    state.update(epoch=0, step_in_epoch=4)
    torch.save(state, tmp_path / "run" / "last.pth")
    resume = dataclasses.replace(cfg, resume=True, epochs=2, allow_change=["epochs"])
    with pytest.raises(ConfigError, match=r"mid-epoch .* --batch-size 8, now 16: .* resume with --batch-size 8"):
        train(dataclasses.replace(resume, batch_size=16, accum_steps=1))
    with pytest.raises(ConfigError, match=r"--workers 0, now 1"):
        train(dataclasses.replace(resume, workers=1))
    state.update(epoch=1, step_in_epoch=0)
    torch.save(state, tmp_path / "run" / "last.pth")
    with pytest.raises(ConfigError, match=r"global batch was 8 .* now 16"):
        train(dataclasses.replace(resume, batch_size=16))
    # The same global batch from an epoch end is fine: 4 x 2 accumulation steps.
    assert train(dataclasses.replace(resume, batch_size=4, accum_steps=2))["epoch"] == 1


def test_no_checkpoint_mid_accumulation() -> None:
    with pytest.raises(ConfigError, match="--checkpoint-every 6 must be a multiple of --accum-steps 4"):
        from pipeline.config import checked

        checked(TrainConfig(shards=["x.tar"], cache="c", accum_steps=4, checkpoint_every=6))


def test_sigkill_and_resume_with_accumulation_is_exact(cache: str, digits_shards: str, tmp_path: Path) -> None:
    """accum 2, a checkpoint every 4 steps: killed at step 7 of epoch 1, resumed: the reference's weights."""
    ref = cfg_for(digits_shards, cache, tmp_path / "ref", accum_steps=2, checkpoint_every=4)
    train(ref)
    cfg = dataclasses.replace(ref, out=str(tmp_path / "run"))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    proc = train_killed_at(path, 15 + 1 + 7 + 1)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    mid = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert (mid["epoch"], mid["step_in_epoch"]) == (1, 4)
    train(dataclasses.replace(cfg, resume=True))
    a = torch.load(tmp_path / "ref" / "last.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "run" / "last.pth", weights_only=True)["model"]
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_epoch_is_saved_before_evaluation_and_skip_reaches_validation(
    cache: str, digits_shards: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    val = write_digits_shards(tmp_path / "val", 30, 30, prefix="val", offset=1000)
    cfg = cfg_for(digits_shards, cache, tmp_path / "run", epochs=1, max_steps_per_epoch=2, val_shards=[val])

    def broken(*args, **kwargs):
        raise OSError("validation storage went away")

    monkeypatch.setattr(train_mod, "evaluate", broken)
    with pytest.raises(OSError, match="went away"):
        train(cfg)
    assert torch.load(tmp_path / "run" / "last.pth", weights_only=True)["epoch"] == 1, "the epoch was lost"
    monkeypatch.undo()

    # A corrupt image in the validation shard: skipped (and counted) under --on-error skip.
    bad = tmp_path / "badval"
    bad.mkdir()
    import webdataset as wds

    src = Path(val.replace("{000000..000000}", "000000"))
    with wds.TarWriter(str(bad / "val-000000.tar")) as sink:
        for i, s in enumerate(wds.WebDataset(str(src), shardshuffle=False)):
            sink.write({"__key__": s["__key__"], "png": b"broken" if i == 4 else s["png"], "cls": s["cls"]})
    skip = dataclasses.replace(cfg, out=str(tmp_path / "skip"), val_shards=[str(bad / "val-000000.tar")])
    result = train(dataclasses.replace(skip, on_error="skip"))
    assert result["samples"] == 29
    with pytest.raises(Exception, match="undecodable"):
        train(dataclasses.replace(skip, out=str(tmp_path / "raise")))


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_failures_are_one_line_before_training(cache: str, digits_shards: str, tmp_path: Path) -> None:
    base = ["train-student", "--shards", digits_shards, "--cache", cache, "--progress", "off", "--workers", "0"]
    tiny = ["--model", "deit_tiny_distilled_patch16_224", "--model-kwargs", str(TINY_STUDENT)]
    # A truncated last.pth, through --resume and through evaluate: named.
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pth").write_bytes(b"PK\x03\x04 truncated")
    code, out = _cli(*base, *tiny, "--out", str(run), "--resume")
    assert code == 2 and out.startswith("error: checkpoint ") and "last.pth" in out and "cannot be read" in out, out
    code, out = _cli("evaluate", "--checkpoint", str(run / "last.pth"), "--shards", digits_shards)
    assert code == 2 and "last.pth" in out and len(out.strip().splitlines()) == 1, out
    # No GPU here: --device cuda is one line.
    if not torch.cuda.is_available():
        code, out = _cli(*base, *tiny, "--out", str(tmp_path / "cuda"), "--device", "cuda")
        assert code == 2 and "torch sees no CUDA device" in out, out
    # An --out that cannot be written: below a file (fails for root too), and read-only where that binds.
    (tmp_path / "a-file").write_text("x")
    code, out = _cli(*base, *tiny, "--out", str(tmp_path / "a-file" / "run"))
    assert code == 2 and "is not writable" in out and len(out.strip().splitlines()) == 1, out
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if not os.access(ro, os.W_OK):  # root can write anyway
        code, out = _cli(*base, *tiny, "--out", str(ro / "sub"))
        assert code == 2 and "is not writable" in out, out
    # A 224 px student for 32 px views: refused before training starts, not at its first batch.
    code, out = _cli(*base, "--model", "deit_tiny_distilled_patch16_224", "--out", str(tmp_path / "size"))
    assert code == 2 and "cannot take 32 px views" in out, out
    assert not (tmp_path / "size" / "metrics.jsonl").exists()
    code, out = _cli(
        "verify-cache", cache, "--shards", digits_shards, "--teacher-checkpoint", "t.pth", "--samples", "0"
    )
    assert code == 2 and "--samples must be >= 1" in out, out


@pytest.mark.slow
def test_sigint_or_sigterm_at_any_moment_leaves_a_loadable_checkpoint(
    cache: str, digits_shards: str, tmp_path: Path
) -> None:
    """Six runs with two loader workers, each sent SIGINT or SIGTERM at a random moment of its first
    seconds (often while the workers start): every one stops non-zero with its position saved."""
    cfg = cfg_for(digits_shards, cache, tmp_path / "x", epochs=50, workers=2, deterministic=False)
    rng = random.Random(5)
    for i in range(6):
        out = tmp_path / f"run{i}"
        path = tmp_path / f"run{i}.yaml"
        path.write_text(yaml.safe_dump(dataclasses.asdict(dataclasses.replace(cfg, out=str(out)))))
        p = subprocess.Popen(
            [*stillroom_cmd(), "train-student", "--config", str(path)],
            cwd=ROOT,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 120
        while not (out / "resolved-config.yaml").exists():  # the Trainer is being built
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()[1][-2000:]
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 2.0))
        signum = signal.SIGINT if i % 2 == 0 else signal.SIGTERM
        p.send_signal(signum)
        _, err = p.communicate(timeout=120)
        assert p.returncode == 128 + signum, (i, p.returncode, err[-2000:])
        assert "interrupted: stopped by signal" in err and "--resume" in err, err[-2000:]
        state = torch.load(out / "last.pth", weights_only=True)
        assert state["epoch"] < 50 and {"model", "optimizer", "identity"} <= state.keys()


def test_same_keys_other_pixels_are_caught(cache: str, digits_shards: str, tiny_teacher: str, tmp_path: Path) -> None:
    """Shards rebuilt with the same keys, labels and counts but other images: the cached targets belong to
    other pixels. train-student refuses at the first read and verify-cache names the sample."""
    import webdataset as wds

    src = Path(digits_shards).parent
    other = tmp_path / "rebuilt"
    other.mkdir()
    for tar in sorted(src.glob("train-*.tar")):
        samples = list(wds.WebDataset(str(tar), shardshuffle=False))
        with wds.TarWriter(str(other / tar.name)) as sink:
            for i, s in enumerate(samples):  # each key keeps its label but gets its neighbour's image
                sink.write({"__key__": s["__key__"], "png": samples[(i + 1) % len(samples)]["png"], "cls": s["cls"]})
    (other / "train.json").write_bytes((src / "train.json").read_bytes())
    pattern = str(other / Path(digits_shards).name)
    with pytest.raises(Exception, match=r"image bytes are not those the cache's teacher saw"):
        train(cfg_for(pattern, cache, tmp_path / "run", epochs=1, max_steps_per_epoch=2))
    code, out = _cli("verify-cache", cache, "--shards", pattern, "--teacher-checkpoint", tiny_teacher, "--samples", "4")
    assert code == 1 and "image bytes differ from the cached sample's" in out, out
    code, out = _cli("verify-cache", cache, "--shards", digits_shards, "--teacher-checkpoint", tiny_teacher)
    assert code == 0, out


def test_validation_classes_must_be_the_training_classes(tmp_path: Path) -> None:
    """A val split packed from a folder missing one class shifts every later label: refused by name, by
    train-student (before training) and by evaluate (against the classes the checkpoint was trained on)."""
    from photos import jpeg

    from pipeline.shards.pack import pack

    for split, classes in (("train", ("ant", "bee", "cat")), ("val", ("ant", "cat"))):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(4):
                (tmp_path / split / c / f"{i}.jpg").write_bytes(jpeg(10 * ord(c[0]) + i, (40, 40)))
    train_meta = pack(str(tmp_path / "train"), str(tmp_path / "shards"), per_shard=12)["train"]
    val_meta = pack(str(tmp_path / "val"), str(tmp_path / "shards"), per_shard=12, prefix="val")["val"]
    train_shards = str(tmp_path / "shards" / train_meta["pattern"])
    val_shards = str(tmp_path / "shards" / val_meta["pattern"])
    cfg = student_config(
        train_shards,
        None,
        tmp_path / "run",
        distillation="none",
        recipe="eval",
        img_size=32,
        epochs=1,
        batch_size=4,
        val_shards=[val_shards],
    )
    with pytest.raises(Exception, match=r"label 1 means 'cat' there but 'bee' in training .*missing: \['bee'\]"):
        train(cfg)
    assert not (tmp_path / "run" / "last.pth").exists()
    train(dataclasses.replace(cfg, val_shards=[]))
    code, out = _cli("evaluate", "--checkpoint", str(tmp_path / "run" / "last.pth"), "--shards", val_shards)
    assert code == 2 and "label 1 means 'cat' there but 'bee' in training" in out, out
    code, out = _cli("evaluate", "--checkpoint", str(tmp_path / "run" / "last.pth"), "--shards", train_shards)
    assert code == 0, out
