"""How views travel between processes, and the logs a batch system reads.

* compact pixels: uint8 for whole-number views, float16 otherwise; phase 1 (teacher batches) and phase 2
  (training batches, shuffled differently) give every (key, view) the same model input bit for bit, hence
  the same teacher logits;
* re-batching costs O(batch), not O(buffer): the time to draw a batch does not grow with the buffer;
* off a terminal, progress is plain log lines (count, rate, ETA, loss), no redraw fragments;
* phase 1 under ``torchrun --nproc-per-node 2`` (one process per GPU on a node) splits the units and
  writes the same cache as one process.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import ROOT, cache_cli_args, child_env, stillroom_cmd

from pipeline.cache import ARRAYS
from pipeline.models.teacher import load_teacher
from pipeline.options import CacheConfig
from pipeline.phase1.cache_teacher import prepare
from pipeline.phase1.unit_stream import UnitStream
from pipeline.phase2.lanes import StreamSpec, WindowBatches, epoch_batches
from pipeline.views import deal as dl
from pipeline.views.pixels import model_input, stack_views
from pipeline.views.plans import epoch_plan
from pipeline.views.recipe import make_recipe


def test_uint8_views_get_the_same_input_alone_or_beside_float16_views() -> None:
    u8 = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    f16 = torch.rand(3, 8, 8).to(torch.float16)
    alone, mixed = stack_views([u8, u8]), stack_views([u8, f16])
    assert alone.dtype == torch.uint8 and mixed.dtype == torch.float16
    assert torch.equal(model_input(alone)[0], model_input(mixed)[0])
    every = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(model_input(every), (every.float() / 255.0).half().float()), "k -> float16(k / 255)"
    assert stack_views([u8]).element_size() == 1 and mixed.element_size() == 2


def test_both_phases_feed_the_teacher_the_same_numbers(digits_shards: str, tiny_teacher: str, tmp_path: Path) -> None:
    """Every (key, view): phase 1's teacher batch and phase 2's training batch hold the same model input."""
    recipe = make_recipe("deit", img_size=32)
    cfg = CacheConfig(
        shards=[digits_shards],
        out=str(tmp_path / "c.zarr"),
        teacher="regnetx_002",
        teacher_checkpoint=tiny_teacher,
        recipe=recipe.to_dict(),
        views=2,
        view_block=2,
        batch_size=16,
        workers=0,
        progress="off",
    )
    job = prepare(cfg)
    shards = job.shards
    phase1: dict[tuple[str, int], torch.Tensor] = {}
    for item in UnitStream([(0, s) for s in range(len(shards))], shards, job.cache.meta, recipe, 16, "raise"):
        if not item["end"]:
            for key, view, x in zip(item["keys"], item["view"].tolist(), model_input(item["pixels"]), strict=True):
                phase1[key, view] = x
    assert {p.dtype for p in phase1.values()} == {torch.float32} and len(phase1) == 240
    teacher, _ = load_teacher("regnetx_002", 10, tiny_teacher, torch.device("cpu"))
    for view in (0, 1):
        plan = epoch_plan(view, 1, 2)
        lanes = [dl.deal(shards, plan, 0, 1).segments(0)]
        spec = StreamSpec(shards, lanes, [], plan, recipe, 0, 10)
        seen = 0
        for batch in epoch_batches(spec, 24, 48, seed=view):
            for key, x in zip(batch["keys"], model_input(batch["pixels"]), strict=True):
                assert torch.equal(x, phase1[key, view]), (key, view)
                seen += 1
            if seen <= 24:  # the teacher itself, one view at a time (no batch-size rounding)
                with torch.no_grad():
                    a = teacher(batch["pixels"][:1])
                    b = teacher(stack_views([phase1[batch["keys"][0], view].half()]))
                assert torch.equal(a, b)
        assert seen == 120


def _chunk(n: int, first: int) -> dict:
    return {
        "lane": 0,
        "first": first,
        "stop": first + n,
        "skipped": [],
        "copy": torch.arange(first, first + n),
        "pixels": torch.zeros(n, 3, 32, 32, dtype=torch.float16),
        "label": torch.zeros(n, dtype=torch.long),
        "mix_label": torch.zeros(n, dtype=torch.long),
        "lam": torch.ones(n),
        "views": torch.zeros(n, dtype=torch.long),
        "keys": [f"k{first + i}" for i in range(n)],
    }


def _seconds_per_batch(window: int, batch: int = 64, batches: int = 30) -> float:
    """Drawing a batch from a window of ``window`` views held in 32-view chunks (no data read)."""
    total = window + batch * (batches + 2)
    recipe = make_recipe("deit", img_size=32)
    spec = StreamSpec([], [[dl.Segment(0, 0, total)]], [0], epoch_plan(0, 1, 1), recipe, 0, 10)
    chunks = (_chunk(min(dl.CHUNK, total - a), a) for a in range(0, total, dl.CHUNK))
    draws = iter(WindowBatches(chunks, spec, window, batch, seed=0, first_step=0))
    next(draws)  # the first window is gathered
    best = float("inf")
    for _ in range(batches):
        t0 = time.perf_counter()
        next(draws)
        best = min(best, time.perf_counter() - t0)
    return best


def test_rebatching_cost_does_not_grow_with_the_window() -> None:
    small, large = _seconds_per_batch(320), _seconds_per_batch(32_000)
    # A batch copies only its own views, whatever the window holds (100 times more views here).
    assert large < 3 * small + 1e-3, f"{small * 1e3:.2f} ms with 320 views held, {large * 1e3:.2f} ms with 32,000"


def test_progress_is_plain_lines_off_a_terminal(digits_shards: str, tiny_teacher: str, tmp_path: Path) -> None:
    args = cache_cli_args(digits_shards, tiny_teacher, tmp_path / "c.zarr", views=2, view_block=1, progress=None)
    env = child_env(STILLROOM_PROGRESS_INTERVAL="0")
    proc = subprocess.run([*stillroom_cmd(), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "cache-teacher:" in line and "img·view" in line]
    assert len(lines) >= 3, proc.stderr[-2000:]
    assert re.search(r"cache-teacher: [\d,]+/240 img·view \(\d+%\) [\d.]+ img·view/s ETA \d+:\d\d:\d\d", lines[0])
    assert "240/240 img·view (100%)" in lines[-1]
    assert "\r" not in proc.stderr and "\x1b[" not in proc.stderr, "no terminal redraw codes in a log file"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_phase1_with_torchrun_two_processes_equals_one(digits_shards: str, tiny_teacher: str, tmp_path: Path) -> None:
    settings = {"views": 2, "view_block": 1, "batch_size": 8, "workers": 0}
    one = tmp_path / "one.zarr"
    two = tmp_path / "two.zarr"
    done = subprocess.run(
        [*stillroom_cmd(), *cache_cli_args(digits_shards, tiny_teacher, one, **settings)],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    torchrun = [str(Path(stillroom_cmd()[0]).with_name("torchrun")), "--nproc-per-node", "2"]
    torchrun += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    cmd = [*torchrun, stillroom_cmd()[0], *cache_cli_args(digits_shards, tiny_teacher, two, **settings)]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "job 0/2 (torchrun)" in proc.stderr and "job 1/2 (torchrun)" in proc.stderr
    summaries = re.findall(r"cache-teacher: (\d+) units done", proc.stdout)
    assert sorted(int(n) for n in summaries) == [3, 3], proc.stdout
    a, b = zarr.open_group(str(one), mode="r"), zarr.open_group(str(two), mode="r")
    for name in ARRAYS:
        assert np.asarray(a[name][...]).tobytes() == np.asarray(b[name][...]).tobytes(), name
