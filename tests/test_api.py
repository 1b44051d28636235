"""The public API (docs/api.md): the cache as a data source and a loss in a loop of one's own.

The invariants: a plain loop over :class:`DistillationSource` with :class:`DistillationLoss` trains the weights
train-student trains with the same options, bit for bit; a loop stopped after step 2 and resumed from
``state_dict()`` trains the weights of the uninterrupted one; a resume replays only the stopped step's window;
the batches' dense targets are the loss's own; and the public names load without torch until used.
"""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from conftest import ROOT, TINY_STUDENT, child_env, student_config, tiny_cache_config, write_digits_shards
from test_exact_pixels import break_one_image
from timm.optim import create_optimizer_v2
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import pipeline
from pipeline import DistillationLoss, DistillationSource, Normalized, StillroomError
from pipeline.errors import CacheError, ConfigError, DataError
from pipeline.phase1.cache_teacher import run as cache_teacher
from pipeline.phase2 import lanes
from pipeline.phase2.metrics import read_lines
from pipeline.phase2.train import train
from pipeline.seeding import stable_seed
from pipeline.train_options import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

# The options a source takes, by their train-student names.
SOURCE_OPTIONS = (
    "batch_size",
    "distillation",
    "tau",
    "teacher_weights",
    "workers",
    "shuffle_buffer",
    "on_error",
    "seed",
    "run_seed",
    "recipe",
    "img_size",
    "repeats",
    "label_key",
)
# Two blocks with drop path on the second: the forward draws noise, so the per-step seed must match.
STUDENT_KW = {**TINY_STUDENT, "depth": 2}


@pytest.fixture(scope="module")
def cache(digits_shards: str, tiny_teacher: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("api") / "cache.zarr"
    cache_teacher(tiny_cache_config(digits_shards, tiny_teacher, out, views=2, view_block=1, batch_size=64))
    return str(out)


def run_config(shards: str, cache: str, out: Path, world: int = 1, **kw: Any) -> TrainConfig:
    """train-student options with a constant learning rate (min_lr = the scaled lr, no warmup), so a plain
    loop with timm's AdamW and no scheduler takes the very same steps."""
    cfg = student_config(shards, cache, out, epochs=1, warmup_epochs=0, model_kwargs=dict(STUDENT_KW), drop_path=0.2)
    cfg = dataclasses.replace(cfg, **kw)
    return dataclasses.replace(cfg, min_lr=scaled_lr(cfg, world))


def scaled_lr(cfg: TrainConfig, world: int) -> float:
    return cfg.lr * cfg.batch_size * world * cfg.accum_steps / 512.0  # DeiT's rule, as train-student applies it


def source_for(cfg: TrainConfig, **kw: Any) -> DistillationSource:
    return DistillationSource(cfg.shards, cfg.cache, **{n: getattr(cfg, n) for n in SOURCE_OPTIONS}, **kw)


class Loop:
    """What a timm ``train.py`` user writes: timm's student and AdamW, the source, the loss, a plain loop."""

    def __init__(self, cfg: TrainConfig, source: DistillationSource, world: int = 1):
        run_seed = source.run_seed
        torch.manual_seed(stable_seed("init", run_seed))  # train-student's initial weights
        self.net = timm.create_model(
            cfg.model, num_classes=source.num_classes, drop_path_rate=cfg.drop_path, **cfg.model_kwargs
        )
        self.net.set_distilled_training(True)
        self.model: torch.nn.Module = Normalized(self.net)
        self.opt = create_optimizer_v2(self.net, "adamw", lr=scaled_lr(cfg, world), weight_decay=cfg.weight_decay)
        if world > 1:
            self.model = DistributedDataParallel(self.model)
        self.source, self.criterion = source, source.loss(alpha=cfg.alpha)

    def run(self, steps: int) -> list[float]:
        self.model.train()
        losses = []
        for _, batch in zip(range(steps), self.source, strict=False):
            torch.manual_seed(batch["noise_seed"])
            loss = self.criterion(self.model(batch["pixels"]), batch)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.net.state_dict(), "opt": self.opt.state_dict(), "data": self.source.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.source.load_state_dict(state["data"])


def train_with_api(cfg: TrainConfig, steps: int, world: int = 1) -> dict[str, torch.Tensor]:
    torch.use_deterministic_algorithms(cfg.deterministic)
    loop = Loop(cfg, source_for(cfg), world)
    loop.run(steps)
    return loop.net.state_dict()


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"tensors differ: {differing[:5]}"


def roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint file gives back (plain values only: weights_only loading)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ------------------------------------------------------------------------------------------
# The same bits as train-student; resume


def test_a_plain_loop_trains_the_weights_of_train_student(cache: str, digits_shards: str, tmp_path: Path) -> None:
    """4 steps, 2 loader workers, drop path on: the API loop's weights == train-student's, bit for bit."""
    cfg = run_config(digits_shards, cache, tmp_path / "run", workers=2, max_steps_per_epoch=4)
    train(cfg)
    ref = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert ref["global_step"] == 4
    assert_same_weights(ref["model"], train_with_api(cfg, 4))


def test_stop_after_step_2_and_resume_from_state_dict_is_exact(cache: str, digits_shards: str, tmp_path: Path) -> None:
    """2 steps, state through a checkpoint file, fresh objects, 2 more == 4 uninterrupted (shuffle buffer of 2
    batches: the resume starts in the epoch's second window)."""
    cfg = run_config(digits_shards, cache, tmp_path, workers=2, shuffle_buffer=16)
    torch.use_deterministic_algorithms(True)
    whole = Loop(cfg, source_for(cfg))
    whole_losses = whole.run(4)

    first = Loop(cfg, source_for(cfg))
    first.run(2)
    state = roundtrip(first.state_dict())
    assert (state["data"]["epoch"], state["data"]["step_in_epoch"]) == (0, 2)
    second = Loop(cfg, source_for(cfg))
    second.load_state_dict(state)
    assert second.source.step == 2
    assert second.run(2) == whole_losses[2:]
    assert_same_weights(whole.net.state_dict(), second.net.state_dict())


def test_a_resume_replays_only_the_window_of_its_step(
    cache: str, digits_shards: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows of 32 copies (4 batches): resumed at step 8, the source reads only the samples of windows 2
    and on, and its batches are those of the uninterrupted epoch from step 8."""
    cfg = run_config(digits_shards, cache, tmp_path, workers=0, shuffle_buffer=32)
    read: Counter = Counter()
    decode = lanes.iter_decoded

    def counting(*args: Any, **kw: Any):
        for sample in decode(*args, **kw):
            read[sample.key] += 1
            yield sample

    monkeypatch.setattr(lanes, "iter_decoded", counting)
    whole = [b["keys"] for b in source_for(cfg)]
    whole_reads, read = sum(read.values()), Counter()
    resumed = source_for(cfg)
    resumed.load_state_dict({**resumed.state_dict(), "step_in_epoch": 8})
    assert [b["keys"] for b in resumed] == whole[8:]
    # The 64 copies of steps 0-7 are not even decoded (a mixing partner from before may be, a few).
    assert whole_reads >= 120 and sum(read.values()) <= whole_reads - 64 + 8, (whole_reads, sum(read.values()))


def test_state_dict_follows_the_epochs_and_refuses_another_run(cache: str, digits_shards: str, tmp_path: Path) -> None:
    cfg = run_config(digits_shards, cache, tmp_path, workers=0)
    source = source_for(cfg)
    steps = len(source)
    assert steps == 15 and len(DataLoader(source, batch_size=None)) == steps
    assert sum(1 for _ in source) == steps
    assert (source.epoch, source.step) == (1, 0), "after its last batch a source stands at the next epoch"
    source.set_epoch(1)
    assert source.state_dict()["epoch"] == 1 and source.state_dict()["step_in_epoch"] == 0
    source.load_state_dict({})  # an empty state is a fresh start, as torchtitan's loaders take it
    assert source.epoch == 1

    mid = {**source.state_dict(), "epoch": 0, "step_in_epoch": 3}
    other_seed = source_for(dataclasses.replace(cfg, run_seed=7))
    with pytest.raises(ConfigError, match="run_seed: 7 now, 0 in the run"):
        other_seed.load_state_dict(mid)
    other_batch = source_for(dataclasses.replace(cfg, batch_size=4))
    with pytest.raises(ConfigError, match="batch-size 8"):
        other_batch.load_state_dict(mid)
    two_ranks = source_for(cfg, rank=0, world=2)
    with pytest.raises(ConfigError, match="on 1 ranks, now 2"):
        two_ranks.load_state_dict(mid)


def test_the_batches_carry_the_losss_own_targets(cache: str, digits_shards: str, tmp_path: Path) -> None:
    """Soft at tau 3: ``soft`` is the loss's distribution (sums to 1), ``labels`` its mixed smoothed labels, the
    teacher ids the cached top-1; DataLoader(batch_size=None) yields the same batches."""
    cfg = run_config(digits_shards, cache, tmp_path, workers=0, distillation="soft", tau=3.0)
    source = source_for(cfg)
    criterion = source.loss(alpha=0.5)
    assert isinstance(criterion, DistillationLoss) and criterion.target_tau == 3.0
    batch = next(iter(source))
    torch.testing.assert_close(batch["soft"], criterion.distill_target(batch), rtol=0, atol=0)
    torch.testing.assert_close(batch["soft"].sum(1), torch.ones(8), rtol=0, atol=1e-5)
    smooth = 0.1 / 10  # the DeiT recipe's label smoothing, over 10 classes
    assert float(batch["labels"].min()) >= smooth - 1e-7 and torch.allclose(batch["labels"].sum(1), torch.ones(8))
    assert torch.equal(batch["teacher_ids"], batch["t_indices"][:, :, 0])
    source.set_epoch(1)
    again = next(iter(DataLoader(source_for(cfg, epoch=0), batch_size=None)))
    assert again["keys"] == batch["keys"] and torch.equal(again["pixels"], batch["pixels"])
    with pytest.raises(ConfigError, match="no logsumexp at tau 3"):  # a soft loss on hard batches
        criterion(torch.zeros(8, 10), next(iter(source_for(dataclasses.replace(cfg, distillation="hard")))))


# ------------------------------------------------------------------------------------------
# The same checks as train-student


def test_an_outer_loader_worker_and_a_torchrun_without_a_group_are_refused(
    cache: str, digits_shards: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = run_config(digits_shards, cache, tmp_path, workers=0)
    with pytest.raises(ConfigError, match="num_workers=0"):
        next(iter(DataLoader(source_for(cfg), batch_size=None, num_workers=1)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="is not initialised"):
        source_for(cfg)
    with pytest.raises(ConfigError, match="rank=2 world=2"):
        source_for(cfg, rank=2, world=2)


def test_caches_of_other_shards_and_other_pixels_are_refused_in_one_line(
    cache: str, digits_shards: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shards the cache never saw: refused when the source is made; same-named shards holding other samples:
    refused at the first batch, by the row check (key and label) train-student makes; replayed pixels that are
    not the teacher's (a digest that differs): refused by the pixel check."""
    unknown = write_digits_shards(tmp_path / "x", 80, 40, prefix="x")
    with pytest.raises(CacheError, match="is not in cache") as e:
        DistillationSource(unknown, cache, batch_size=8, workers=0)
    assert isinstance(e.value, StillroomError) and "\n" not in str(e.value)
    impostors = write_digits_shards(tmp_path / "other", 80, 40, offset=500)
    source = DistillationSource(impostors, cache, batch_size=8, workers=0)
    with pytest.raises(CacheError, match="this cache was not built from these shards") as e:
        next(iter(source))
    assert "\n" not in str(e.value)
    monkeypatch.setattr(lanes, "pixel_digest", lambda pixels: 1)  # as if this machine replayed other pixels
    with pytest.raises(CacheError, match="replays other pixels than the cache's teacher saw") as e:
        list(DistillationSource(digits_shards, cache, batch_size=8, workers=0))
    assert "\n" not in str(e.value)


def test_an_unreadable_sample_is_skipped_and_counted_as_train_student_counts_it(
    cache: str, digits_shards: str, tmp_path: Path
) -> None:
    """One image broken after caching: ``on_error="skip"`` skips it (and its mixing partner), fills their slots
    and counts them, the epoch's account equal to train-student's; ``"raise"`` stops on it in one line."""
    shards, broken = break_one_image(digits_shards, tmp_path / "shards")
    cfg = run_config(shards, cache, tmp_path / "run", workers=0, on_error="skip")
    train(cfg)
    (epoch,) = [line for line in read_lines(str(tmp_path / "run" / "metrics.jsonl")) if line["event"] == "epoch"]
    source = source_for(cfg)
    trained = Counter(k for batch in source for k in batch["keys"])
    assert broken not in trained and source.account() == epoch["copies"]
    assert sum(epoch["copies"]["skipped"].values()) == 2 == epoch["copies"]["filled"]
    with pytest.raises(DataError, match=broken) as e:
        list(source_for(dataclasses.replace(cfg, on_error="raise")))
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------
# The public names


def test_the_public_names_load_lazily_without_torch() -> None:
    """``pipeline.errors`` and the shards layer stay torch-free; every name of ``__all__`` resolves."""
    assert pipeline.__all__ == sorted(pipeline._PUBLIC)
    code = (
        "import sys, pipeline, pipeline.errors, pipeline.shards.lists\n"
        "from pipeline import StillroomError\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert [getattr(pipeline, n).__name__ for n in pipeline.__all__] == pipeline.__all__
    assert set(pipeline.__all__) <= set(dir(pipeline))
    with pytest.raises(AttributeError):
        _ = pipeline.NoSuchName
