"""Work split across batch jobs: every unit is done by exactly one worker, whatever sets the slot."""

from __future__ import annotations

import pytest

from pipeline.errors import ConfigError
from pipeline.partition import job_slot, my_share

UNITS = [(b, s) for b in range(3) for s in range(7)]


def _cover(slots: list[tuple[int, int, str]]) -> list:
    return sorted(u for index, count, _ in slots for u in my_share(UNITS, index, count))


@pytest.mark.parametrize(
    ("index_var", "count_var"),
    [
        ("RANK", "WORLD_SIZE"),
        ("AWS_BATCH_JOB_ARRAY_INDEX", "AWS_BATCH_JOB_ARRAY_SIZE"),
        ("JOB_COMPLETION_INDEX", "STILLROOM_JOB_COUNT"),
        ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"),
    ],
)
def test_env_slots_cover_every_unit_once(index_var: str, count_var: str) -> None:
    slots = [job_slot(env={index_var: str(i), count_var: "4"}) for i in range(4)]
    assert _cover(slots) == sorted(UNITS)


def test_torchrun_inside_array_job_flattens_task_and_rank() -> None:
    slots = [
        job_slot(
            env={
                "RANK": str(r),
                "WORLD_SIZE": "2",
                "SLURM_ARRAY_TASK_ID": str(t + 5),
                "SLURM_ARRAY_TASK_MIN": "5",
                "SLURM_ARRAY_TASK_COUNT": "3",
            }
        )
        for t in range(3)
        for r in range(2)
    ]
    assert sorted(index for index, _, _ in slots) == list(range(6))
    assert _cover(slots) == sorted(UNITS)


def test_flags_win_and_bad_slots_are_refused() -> None:
    assert job_slot(1, 3, env={"RANK": "0", "WORLD_SIZE": "2"})[:2] == (1, 3)
    with pytest.raises(ConfigError, match="not in"):
        job_slot(3, 3)
    with pytest.raises(ConfigError, match="STILLROOM_JOB_COUNT"):
        job_slot(env={"JOB_COMPLETION_INDEX": "0"})
