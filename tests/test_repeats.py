"""DeiT's repeated augmentation, content-addressed (issue: DeiT's whole recipe from the cache).

* the schedule (which samples an epoch trains, with which views) is the same for world sizes 1, 2, 4
  and worker counts 0, 2: it depends on (seed, epoch, shard, key) only;
* every trained sample gets R distinct views per epoch, its copies reach the trainer in the same or the
  next batch, and an epoch has the steps of an epoch without repeats;
* over V epochs no (sample, view) is used twice, and every sample uses every view;
* a sample meets a new mixing partner every RA block (every epoch at R = 1);
* R = 1 is one group and view ``e mod V``; refusals name the field.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from conftest import write_digits_shards

from pipeline.phase2.lanes import StreamSpec, epoch_batches
from pipeline.shards.lists import ShardInfo, load_shard_list
from pipeline.views import deal as dl
from pipeline.views.mixing import partners
from pipeline.views.plans import covered, epoch_plan, group_size
from pipeline.views.recipe import make_recipe

SEED, R, V = 7, 3, 6


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[ShardInfo]:
    """90 digits in 5 shards of 18 (odd group sizes would show; 18 = 3 x 6)."""
    return load_shard_list(write_digits_shards(tmp_path_factory.mktemp("ra"), 90, 18, prefix="ra"))


def recipe():
    return make_recipe("deit", img_size=32, repeats=R)


def spec(shards: list[ShardInfo], epoch: int, rank: int, world: int, workers: int = 0) -> StreamSpec:
    plan = epoch_plan(epoch, R, V)
    segments = dl.deal(shards, plan, SEED, world).segments(rank)
    return StreamSpec(
        shards=shards,
        lanes=dl.split_lanes(segments, max(workers, 1)),
        starts=[],
        plan=plan,
        recipe=recipe(),
        seed=SEED,
        num_classes=10,
        pairing=R,
    )


def schedule(shards: list[ShardInfo], epoch: int, world: int, workers: int) -> Counter:
    """(key, view) -> times trained in ``epoch``, over all ranks, read from the real batches."""
    seen: Counter = Counter()
    for rank in range(world):
        for batch in epoch_batches(spec(shards, epoch, rank, world, workers), 8, 16, seed=rank):
            for key, view in zip(batch["keys"], batch["views"].tolist(), strict=True):
                seen[key, view] += 1
    return seen


def test_schedule_is_the_same_for_any_world_size_and_worker_count(shards: list[ShardInfo]) -> None:
    for epoch in (0, 4):
        reference = schedule(shards, epoch, 1, 0)
        assert set(reference.values()) == {1}, "a (sample, view) is trained once per epoch"
        per_key = Counter(key for key, _ in reference)
        assert set(per_key.values()) == {R}, "each trained sample gets R copies"
        assert len(per_key) == 90 // R, "an epoch trains 1/R of the samples"
        assert {view for _, view in reference} == set(epoch_plan(epoch, R, V).views)
        for world, workers in ((2, 0), (4, 0), (1, 2), (2, 2), (7, 0)):
            got = schedule(shards, epoch, world, workers)
            padded = math.ceil(30 / world) * world - 30  # DeiT-like padding: a few samples trained twice
            assert set(got) == set(reference), (epoch, world, workers)
            assert sum(got.values()) - sum(reference.values()) == R * padded, (epoch, world, workers)
            assert max(got.values()) <= 2


def test_every_view_once_over_v_epochs_and_each_sample_once_per_r_epochs(shards: list[ShardInfo]) -> None:
    used: dict[str, list[int]] = defaultdict(list)
    for epoch in range(V):
        plan = epoch_plan(epoch, R, V)
        trained = {(s.name, p) for s in shards for p in covered(plan, SEED, s)}
        if epoch % R == 0:
            cycle: set = set()
        assert not cycle & trained, "a sample is trained once in every R epochs"
        cycle |= trained
        if epoch % R == R - 1:
            assert len(cycle) == 90
        for name, p in trained:
            used[f"{name}/{p}"] += list(plan.views)
    assert len(used) == 90
    for key, views in used.items():
        assert sorted(views) == list(range(V)), f"{key} used views {views}"
    # Past V epochs the views come back in the same order (and train-student warns).
    assert epoch_plan(V, R, V) == dataclasses.replace(epoch_plan(0, R, V), epoch=V)


def test_copies_arrive_together_and_steps_match_no_repeats(shards: list[ShardInfo]) -> None:
    batch_size = 8
    where: dict[str, list[int]] = defaultdict(list)
    s = spec(shards, 1, 0, 1)
    d = dl.deal(shards, s.plan, SEED, 1)
    assert d.steps(batch_size) == dl.deal(shards, epoch_plan(1, 1, V), SEED, 1).steps(batch_size) == math.ceil(90 / 8)
    batches = list(epoch_batches(s, batch_size, 48, seed=3))
    assert len(batches) == d.steps(batch_size) and sum(len(b["keys"]) for b in batches) == 90, "every copy, once"
    for n, batch in enumerate(batches):
        for key in batch["keys"]:
            where[key].append(n)
    assert all(len(v) == R for v in where.values()) and len(where) == 90 // R
    spread = [max(v) - min(v) for v in where.values()]
    assert max(spread) <= 1, "a sample's copies must be in the same or the next batch"


def test_partners_change_with_every_block() -> None:
    """1000-sample shard, V = 300: a sample keeps its partner for the R views of a block (as DeiT's
    repeated copies often do) and meets a new one every block: ~95 at R = 3 (100 blocks), ~259 at R = 1."""
    for repeats, least, median in ((3, 80, 90), (1, 200, 240)):
        met: dict[int, set[int]] = defaultdict(set)
        for block in range(300 // repeats):
            for a, b in partners(SEED, block, "train-000000.tar", 1000, repeats, range(1000)):
                if b is not None:
                    met[a].add(b)
                    met[b].add(a)
        sizes = sorted(len(p) for p in met.values())
        assert sizes[0] > least and sizes[len(sizes) // 2] > median, (repeats, sizes[:5])


def test_r1_is_every_sample_with_view_e_mod_v(shards: list[ShardInfo]) -> None:
    for epoch in range(9):
        plan = epoch_plan(epoch, 1, 4)
        assert plan.views == (epoch % 4,) and plan.group == 0
        assert all(covered(plan, SEED, s) == list(range(s.count)) for s in shards)
    assert [group_size(10, 3, g) for g in range(3)] == [4, 3, 3]


def test_train_student_refuses_other_repeats_and_cache_refuses_uneven_views(
    tmp_path: Path, digits_shards: str, tiny_teacher: str
) -> None:
    from conftest import tiny_cache_config

    from pipeline.errors import ConfigError
    from pipeline.phase1.cache_teacher import run
    from pipeline.phase2.train import train
    from pipeline.train_options import TrainConfig

    with pytest.raises(ConfigError, match="--views 4 must be a multiple of --repeats 3"):
        run(tiny_cache_config(digits_shards, tiny_teacher, tmp_path / "bad", views=4, view_block=2, repeats=3))
    cache = tmp_path / "cache"
    run(tiny_cache_config(digits_shards, tiny_teacher, cache, views=3, view_block=3, repeats=3))
    cfg = TrainConfig(shards=[digits_shards], cache=[str(cache)], out=str(tmp_path / "run"), repeats=2, progress="off")
    with pytest.raises(ConfigError, match=r"--repeats 2: .* drawn for 3 repeats \(recipe\.repeats\)"):
        train(cfg)
