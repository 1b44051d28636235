"""Fixtures for the whole suite: small real data (scikit-learn digits) and tiny models.

Photo-like images in every mode and format are made by ``tests/photos.py``; the suite reads nothing
from outside the repository.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.options import CacheConfig  # noqa: E402
from pipeline.shards.pack import _write_split, digits_items  # noqa: E402
from pipeline.train_options import TrainConfig  # noqa: E402

# OMP_NUM_THREADS=1 when other work shares the cores: two spinning OpenMP threads on a busy core are ~100x slower.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))

TINY_STUDENT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
# What every test cache shares (the ``tiny_teacher`` on 32 px digits); tests vary views, blocks, batch.
TINY_CACHE = {
    "teacher": "regnetx_002",
    "img_size": 32,
    "topk": 5,
    "temperatures": [1.0, 3.0],
    "workers": 0,
    "progress": "off",
}


def tiny_cache_config(shards: str, checkpoint: str, out: Path, **kw) -> CacheConfig:
    """``TINY_CACHE`` over ``shards`` into ``out``; keyword arguments override any field."""
    return CacheConfig(**{**TINY_CACHE, "shards": shards, "out": str(out), "teacher_checkpoint": checkpoint, **kw})


def student_config(shards: str, cache: str | list[str] | None, out: Path, **kw) -> TrainConfig:
    """A tiny DeiT student on 32 px views, two epochs of batch 8, deterministic; ``kw`` overrides any field."""
    base = TrainConfig(
        shards=[shards],
        cache=[cache] if isinstance(cache, str) else list(cache or []),
        out=str(out),
        model="deit_tiny_distilled_patch16_224",
        model_kwargs=dict(TINY_STUDENT),
        epochs=2,
        batch_size=8,
        workers=0,
        lr=0.2,
        warmup_epochs=1,
        log_every=1,
        progress="off",
        deterministic=True,
    )
    return dataclasses.replace(base, **kw)


def cache_cli_args(shards: str, checkpoint: str, out: Path, **kw) -> list[str]:
    """``cache-teacher`` flags for the settings of ``tiny_cache_config(**kw)``; a ``None`` value
    leaves its flag out (the CLI default applies)."""
    fields = {**TINY_CACHE, "shards": shards, "out": str(out), "teacher_checkpoint": checkpoint, **kw}
    args = ["cache-teacher"]
    for name, value in fields.items():
        flag = name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            args.append(f"--{flag}" if value else f"--no-{flag}")
        elif isinstance(value, list):
            args += [f"--{flag}", ",".join(f"{v:g}" for v in value)]
        else:
            args += [f"--{flag}", str(value)]
    return args


def done_markers(out: Path) -> int:
    """Completion markers a cache holds on disk (zarr's in-flight ``*.partial`` temp files excluded)."""
    root = out / "done" / "c"
    return sum(1 for p in root.rglob("*") if p.is_file() and not p.name.endswith(".partial")) if root.exists() else 0


def stillroom_cmd() -> list[str]:
    """The installed console script, or the module when the package is not installed."""
    exe = Path(sys.executable).with_name("stillroom")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "cli.main"]


# train-student in a child process, SIGKILLed on its KILL_AT_CALL-th call of ``any_rank``: once at
# the start of every step and once after every epoch, so the call number names an exact position.
_KILLER = """
import os, signal, sys
import pipeline.phase2.train as t
calls, kill_at, any_rank = [0], int(os.environ["KILL_AT_CALL"]), t.any_rank
def counting(*args, **kwargs):
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return any_rank(*args, **kwargs)
t.any_rank = counting
from cli.main import app
app(sys.argv[1:], prog_name="stillroom")
"""


def child_env(**extra: str) -> dict[str, str]:
    """Environment for a child process: the repository importable, one OpenMP thread (so its teacher
    output bits equal the in-process runs' under ``one_thread``), output unbuffered; ``extra`` added."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **extra}


def train_killed_at(config: Path, call: int, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``train-student --config config`` and SIGKILL it at its ``call``-th step check (see above)."""
    return subprocess.run(
        [sys.executable, "-c", _KILLER, "train-student", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(KILL_AT_CALL=str(call)),
    )


def write_digits_shards(out: Path, n: int, per_shard: int, prefix: str = "train", offset: int = 0) -> str:
    """Pack ``n`` digits (starting at ``offset``) into ``out/<prefix>-*.tar``; return the brace pattern."""
    classes, items = digits_items(32)
    chosen = list(itertools.islice(items, offset, offset + n))
    meta = _write_split(chosen, str(out), prefix, per_shard, classes)
    return str(out / meta["pattern"])


def break_one_image(shards: str, out: Path) -> tuple[str, str]:
    """A copy of the shards where one sample's image has 16 zeroed bytes (same size, same tar)."""
    src = Path(shards).parent
    shutil.copytree(src, out)
    tar = out / "train-000001.tar"
    with tarfile.open(tar) as t:
        member = next(m for m in t.getmembers() if m.name.endswith(".png") and m.name.startswith("digits-"))
    data = bytearray(tar.read_bytes())
    at = member.offset_data + member.size // 2
    data[at : at + 16] = bytes(16)
    tar.write_bytes(bytes(data))
    return str(out / Path(shards).name), member.name.split(".")[0]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): two
    threads on two busy cores make conv2d ~100x slower (OpenMP spinning), and subprocesses run with one,
    so the teacher's output bits agree between in-process and subprocess runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    torch.use_deterministic_algorithms(False)  # TrainConfig.deterministic sets it process-wide


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """120 real digits in 3 shards of 40 (pattern string)."""
    return write_digits_shards(tmp_path_factory.mktemp("digits"), 120, 40)


@pytest.fixture(scope="session")
def digits_val_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_digits_shards(tmp_path_factory.mktemp("digits-val"), 60, 30, prefix="val", offset=1000)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory, digits_shards: str) -> str:
    """A regnetx_002 for 10 classes, trained here for a few seconds on the digits, as a plain state dict.

    Trained, not random: a random-init network predicts one class for every image, so its hard targets
    could not tell one view from another, and tests of the invariant (cached targets belong to the very
    pixels trained on) would pass even if views were swapped. This one's top-1 varies with the view.
    """
    from pipeline.phase2.train import train
    from pipeline.train_options import TrainConfig

    folder = tmp_path_factory.mktemp("teacher")
    mild = {"name": "deit", "img_size": 32, "auto_augment": None, "reprob": 0.0, "mixup_prob": 0.0, "hflip": 0.0}
    cfg = TrainConfig(
        shards=[digits_shards],
        out=str(folder / "run"),
        model="regnetx_002",
        distillation="none",
        recipe={**mild, "color_jitter": 0.0, "scale": [0.5, 1.0]},
        epochs=4,
        batch_size=20,
        lr=0.3,
        warmup_epochs=0,
        drop_path=0.0,
        workers=0,
        progress="off",
    )
    train(cfg)
    path = folder / "regnetx_002.pth"
    torch.save(torch.load(folder / "run" / "last.pth", weights_only=True)["model"], path)
    return str(path)
