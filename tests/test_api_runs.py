"""The public API end to end, in processes of their own: the examples of docs/examples/ on a cache made here
(shards and settings no other test uses), and a plain loop under a 2-rank torchrun (gloo, CPU) against
train-student under the same torchrun, bit for bit."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, child_env, tiny_cache_config, write_digits_shards
from safetensors.torch import load_file
from test_api import assert_same_weights, run_config
from test_ddp import TORCHRUN, free_port

from pipeline.phase1.cache_teacher import run as cache_teacher

pytestmark = pytest.mark.slow
EXAMPLES = ROOT / "docs" / "examples"
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def unseen(tiny_teacher: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """``x-{000000..000002}.tar`` (other digits than the suite's) and a cache of them with its own seed and K."""
    root = tmp_path_factory.mktemp("unseen")
    shards = write_digits_shards(root, 96, 32, prefix="x", offset=300)
    cache = root / "cache.zarr"
    cache_teacher(tiny_cache_config(shards, tiny_teacher, cache, views=1, view_block=1, seed=11, topk=3))
    return shards, str(cache)


def example(name: str, *args: str) -> list[str]:
    """Run ``python docs/examples/NAME args``; returns its ``step N loss X`` lines (exit 0 required)."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [line for line in done.stdout.splitlines() if line.startswith("step ")]


@pytest.fixture(scope="module")
def plain_runs(unseen: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """own_loop.py: the issue's command (3 steps), then 2 steps with --out and a rerun to 3 that resumes."""
    shards, cache = unseen
    out = str(tmp_path_factory.mktemp("own-loop") / "run")
    common = ["--shards", shards, "--cache", cache]
    return {
        "whole": example("own_loop.py", *common, "--steps", "3"),
        "stopped": example("own_loop.py", *common, "--steps", "2", "--out", out),
        "resumed": example("own_loop.py", *common, "--steps", "3", "--out", out),
        "out": out,
    }


def test_own_loop_trains_on_a_cache_it_never_saw_and_resumes(unseen: tuple[str, str], plain_runs: dict) -> None:
    """``own_loop.py --shards 'DIR/x-{000000..000002}.tar' --cache C --steps 3`` exits 0 with a loss per step;
    stopped after 2 steps and rerun with the same --out, its step 2 is the uninterrupted run's."""
    assert unseen[0].endswith("/x-{000000..000002}.tar")
    whole = plain_runs["whole"]
    assert [line.split()[:2] for line in whole] == [["step", "0"], ["step", "1"], ["step", "2"]], whole
    assert plain_runs["stopped"] == whole[:2]
    assert plain_runs["resumed"] == whole[2:]


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="accelerate is not installed (dev extra)")
def test_the_accelerate_example_trains_the_bits_of_the_plain_loop(
    unseen: tuple[str, str], plain_runs: dict, tmp_path: Path
) -> None:
    """Under Accelerate, stopped after 2 steps and resumed from its saved state: the plain loop's losses, and
    the weights of the plain loop stopped and resumed at the same step, bit for bit."""
    shards, cache = unseen
    out = str(tmp_path / "accelerate")
    common = ["--shards", shards, "--cache", cache]
    assert example("accelerate_loop.py", *common, "--steps", "2", "--out", out) == plain_runs["whole"][:2]
    assert example("accelerate_loop.py", *common, "--steps", "3", "--out", out) == plain_runs["whole"][2:]
    weights = load_file(str(Path(out) / "model.safetensors"))
    ours = torch.load(Path(plain_runs["out"]) / "last.pth", weights_only=True)["model"]
    assert_same_weights(ours, {k.removeprefix("net."): v for k, v in weights.items()})


# Under torchrun: the plain loop of test_api.py on this rank's share, then train-student in the same processes
# (it joins the group the loop made, and closes it).
_DDP_SCRIPT = """
import sys
import torch, torch.distributed as dist, yaml
sys.path.insert(0, {tests!r})
from test_api import train_with_api
from pipeline.phase2.train import train
from pipeline.train_options import TrainConfig

torch.set_num_threads(1)
cfg = TrainConfig(**yaml.safe_load(open(sys.argv[1])))
dist.init_process_group("gloo")
weights = train_with_api(cfg, 4, world=2)
if dist.get_rank() == 0:
    torch.save(weights, sys.argv[2])
train(cfg)
"""


def test_two_ranks_a_plain_loop_trains_the_weights_of_train_student(
    digits_shards: str, tiny_teacher: str, tmp_path: Path
) -> None:
    cache = tmp_path / "cache.zarr"
    cache_teacher(tiny_cache_config(digits_shards, tiny_teacher, cache, views=2, view_block=1, batch_size=64))
    cfg = run_config(digits_shards, str(cache), tmp_path / "run", world=2, workers=1, max_steps_per_epoch=4)
    config, script = tmp_path / "run.yaml", tmp_path / "ddp_loop.py"
    config.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    script.write_text(_DDP_SCRIPT.format(tests=str(ROOT / "tests")))
    port = ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    cmd = [TORCHRUN, "--nproc-per-node", "2", *port, str(script), str(config), str(tmp_path / "api.pth")]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), start_new_session=True, **pipes)
    try:
        _, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"the 2-rank run hung for {TIMEOUT_S}s:\n{err[-3000:]}")
    assert proc.returncode == 0, err[-5000:]
    ref = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert ref["world"] == 2 and ref["global_step"] == 4
    assert_same_weights(ref["model"], torch.load(tmp_path / "api.pth", weights_only=True))
