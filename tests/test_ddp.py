"""Two-process DDP on CPU (gloo) through ``torchrun ... stillroom train-student`` with a tiny cache.

Each rank writes, per step, its batch's sample keys and a digest of its parameters (the
``STILLROOM_DEBUG_DIR`` hook of :mod:`pipeline.phase2.train`), so the tests can check that ranks read
disjoint samples, stay bit-identical after every step, and take the same number of steps even when
their shards hold different numbers of samples.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, student_config, tiny_cache_config, write_digits_shards

from pipeline.phase1.cache_teacher import run as cache_teacher
from pipeline.shards.lists import load_shard_list
from pipeline.shards.samples import iter_raw
from pipeline.train_options import TrainConfig
from pipeline.views import deal as dl
from pipeline.views.plans import epoch_plan

TORCHRUN = str(ROOT / ".venv" / "bin" / "torchrun")
STILLROOM = str(ROOT / ".venv" / "bin" / "stillroom")
TIMEOUT_S = 300


def build_cache(shards: str, teacher: str, out: Path, views: int) -> str:
    cache_teacher(tiny_cache_config(shards, teacher, out, views=views, view_block=2, batch_size=64))
    return str(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_train(cfg: TrainConfig, debug_dir: Path, ok: bool = True, **env: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 stillroom train-student --config``; kills the group on a hang."""
    path = Path(cfg.out).with_suffix(".yaml")
    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    cmd = [
        TORCHRUN,
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        STILLROOM,
        "train-student",
        "--config",
        str(path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STILLROOM_DEBUG_DIR": str(debug_dir), "PYTHONPATH": str(ROOT), **env}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"DDP training hung for {TIMEOUT_S}s:\n{err[-3000:]}")
    assert (proc.returncode == 0) == ok, err[-5000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def read_steps(debug_dir: Path, rank: int) -> list[dict]:
    with open(debug_dir / f"rank{rank}.jsonl") as f:
        return [json.loads(line) for line in f]


def by_epoch(steps: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = defaultdict(list)
    for s in steps:
        out[s["epoch"]].append(s)
    return out


def shard_keys(spec: str) -> list[list[str]]:
    return [[r.key for r in iter_raw(s, i)] for i, s in enumerate(load_shard_list(spec))]


def cfg_for(shards: str, cache: str, out: Path, **kw) -> TrainConfig:
    """conftest's tiny student with one loader worker per rank (torchrun runs real worker processes)."""
    return student_config(shards, cache, out, workers=1, deterministic=False, **kw)


def planned_keys(cfg: TrainConfig, epoch: int, rank: int, views: int) -> Counter:
    """The keys rank ``rank`` trains in ``epoch`` by the deal (its samples' copies; padding counted twice)."""
    shards = load_shard_list(cfg.shards)
    keys = shard_keys(cfg.shards)
    plan = epoch_plan(epoch, 1, views)
    out: Counter = Counter()
    for seg in dl.deal(shards, plan, 0, 2).segments(rank):
        for p, _ in dl.lane_samples(seg, 0, plan, shards[seg.shard], 1):
            out[keys[seg.shard][p]] += 1
    return out


def check_ranks(cfg: TrainConfig, debug_dir: Path, views: int) -> dict[int, dict[int, list[dict]]]:
    """Shared checks: each rank trains its share of the plan, both take the same steps, parameters stay equal."""
    shards = load_shard_list(cfg.shards)
    ranks = {r: by_epoch(read_steps(debug_dir, r)) for r in (0, 1)}
    assert sorted(ranks[0]) == sorted(ranks[1]) == list(range(cfg.epochs))
    for epoch in range(cfg.epochs):
        steps = dl.deal(shards, epoch_plan(epoch, 1, views), 0, 2).steps(cfg.batch_size)
        trained = []
        for r in (0, 1):
            rows = ranks[r][epoch]
            assert [s["step"] for s in rows] == list(range(steps)), f"rank {r} epoch {epoch}"
            keys = Counter(k for s in rows for k in s["keys"])
            assert keys == planned_keys(cfg, epoch, r, views), f"rank {r} epoch {epoch} trained other samples"
            trained.append(keys)
        every = {k for keys in shard_keys(cfg.shards) for k in keys}
        assert set(trained[0]) | set(trained[1]) == every, f"epoch {epoch}: a planned sample was not trained"
        padded = sum((trained[0] + trained[1]).values()) - len(every)
        assert 0 <= padded < 2, f"epoch {epoch}: {padded} samples padded, at most world - 1 expected"
        digests = [[s["params_sha256"] for s in ranks[r][epoch]] for r in (0, 1)]
        assert digests[0] == digests[1], f"epoch {epoch}: parameters differ between ranks"
    all_digests = [s["params_sha256"] for e in range(cfg.epochs) for s in ranks[0][e]]
    assert len(set(all_digests)) == len(all_digests), "every step must change the parameters"
    return ranks


def test_ddp_two_ranks_disjoint_in_sync_and_learning(
    digits_shards: str, digits_val_shards: str, tiny_teacher: str, tmp_path: Path
) -> None:
    cache = build_cache(digits_shards, tiny_teacher, tmp_path / "cache.zarr", views=4)
    cfg = cfg_for(digits_shards, cache, tmp_path / "run", val_shards=digits_val_shards, epochs=4, lr=0.5)
    proc = torchrun_train(cfg, tmp_path / "debug")
    check_ranks(cfg, tmp_path / "debug", views=4)

    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    start = next(m for m in metrics if m["event"] == "start")
    assert start["world"] == 2 and start["global_batch"] == 16
    loss = defaultdict(list)
    for m in metrics:
        if m["event"] == "train":
            loss[m["epoch"]].append(m["loss"])
    first, last = sum(loss[0]) / len(loss[0]), sum(loss[3]) / len(loss[3])
    # The teacher's hard targets on mixed, augmented views are hard to fit: the loss falls a few percent,
    # how many depends on the CPU's float paths (0.4% to 4.8% measured), so only the direction is checked.
    assert last < first, f"loss did not fall: epoch 0 mean {first:.3f}, epoch 3 mean {last:.3f}"
    # Evaluation gathers both ranks' validation shards (2 shards of 30).
    epochs = [m for m in metrics if m["event"] == "epoch"]
    assert [m["samples"] for m in epochs] == [60] * 4
    final = json.loads(proc.stdout.strip().splitlines()[-1])["final"]
    assert final["epoch"] == 3 and "top1_avg" in final
    assert (tmp_path / "run" / "last.pth").exists() and (tmp_path / "run" / "best.pth").exists()


def test_ddp_uneven_shards_same_steps_no_hang(tiny_teacher: str, tmp_path: Path) -> None:
    """Shards of 45, 45 and 10 samples on 2 ranks: ranks get equal shares (parts of shards), the same
    steps, and every planned sample is trained."""
    shards = write_digits_shards(tmp_path / "uneven", 100, 45)
    infos = load_shard_list(shards)
    assert [s.count for s in infos] == [45, 45, 10]
    cache = build_cache(shards, tiny_teacher, tmp_path / "cache.zarr", views=2)
    cfg = cfg_for(shards, cache, tmp_path / "run", epochs=2, batch_size=4, lr=0.1)
    torchrun_train(cfg, tmp_path / "debug")
    ranks = check_ranks(cfg, tmp_path / "debug", views=2)
    assert all(len(ranks[0][e]) == len(ranks[1][e]) == 13 for e in range(cfg.epochs))  # 50 samples, batch 4


def test_ddp_one_shard_two_ranks_and_an_exact_resume(tiny_teacher: str, tmp_path: Path) -> None:
    """One shard of 40 samples on 2 ranks (more ranks than shards used to be refused): each trains its
    half. Stopped at step 3 of epoch 0 on both ranks and resumed, the weights equal an uninterrupted
    run's, bit for bit (every rank's noise is seeded by its step: nothing is lost with rank 0's RNG)."""
    shards = write_digits_shards(tmp_path / "one", 40, 40)
    cache = build_cache(shards, tiny_teacher, tmp_path / "cache.zarr", views=2)
    cfg = cfg_for(shards, cache, tmp_path / "whole", epochs=2, batch_size=4, lr=0.1, drop_path=0.1)
    torchrun_train(cfg, tmp_path / "debug-whole")
    check_ranks(cfg, tmp_path / "debug-whole", views=2)
    parts = dataclasses.replace(cfg, out=str(tmp_path / "parts"))
    stopped = torchrun_train(parts, tmp_path / "debug-a", ok=False, STILLROOM_DEBUG_STOP_AT_STEP="3")
    assert "stopped by signal 15 at epoch 0 step 3" in stopped.stderr, stopped.stderr[-3000:]
    state = torch.load(tmp_path / "parts" / "last.pth", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, 3, 3)
    torchrun_train(dataclasses.replace(parts, resume=True), tmp_path / "debug-b")
    whole = torch.load(tmp_path / "whole" / "last.pth", weights_only=True)["model"]
    resumed = torch.load(tmp_path / "parts" / "last.pth", weights_only=True)["model"]
    assert all(torch.equal(whole[k], resumed[k]) for k in whole), "the resumed 2-rank run differs"


@pytest.mark.parametrize("distillation", ["none", "soft"])
def test_ddp_trains_in_every_distillation_mode(
    distillation: str, digits_shards: str, tiny_teacher: str, tmp_path: Path
) -> None:
    """``none`` leaves the distilled DeiT's distillation head without a gradient: DDP must allow it."""
    cache = build_cache(digits_shards, tiny_teacher, tmp_path / "cache.zarr", views=2)
    mode = {"distillation": distillation, "tau": 3.0, "recipe": {"name": "deit", "img_size": 32}}
    cfg = cfg_for(digits_shards, cache, tmp_path / "run", epochs=1, **mode)
    torchrun_train(cfg, tmp_path / "debug")
    check_ranks(cfg, tmp_path / "debug", views=2)
