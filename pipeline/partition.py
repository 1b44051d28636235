"""Which share of the work this process does: explicit flags, else the batch system's environment.

Units are split by striding a deterministic list, so any (index, count) pair gets a disjoint
share and all shares together cover every unit exactly once.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TypeVar

T = TypeVar("T")

# (index variable, count variable, what sets them)
_ENV_SOURCES = (
    ("RANK", "WORLD_SIZE", "torchrun"),
    ("AWS_BATCH_JOB_ARRAY_INDEX", "AWS_BATCH_JOB_ARRAY_SIZE", "AWS Batch array job"),
    ("JOB_COMPLETION_INDEX", "STILLROOM_JOB_COUNT", "Kubernetes indexed Job"),
    ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "Slurm array"),
)


def job_slot(
    job_index: int | None = None, job_count: int | None = None, env: Mapping[str, str] | None = None
) -> tuple[int, int, str]:
    """Return ``(index, count, source)`` for this worker.

    Kubernetes sets only ``JOB_COMPLETION_INDEX``; the count is the Job's ``completions``, which
    the pod must be told (``--job-count`` or ``STILLROOM_JOB_COUNT``). Slurm array ids may start
    at ``SLURM_ARRAY_TASK_MIN``; they are shifted to start at 0.
    """
    env = os.environ if env is None else env
    if job_index is not None or job_count is not None:
        index, count, source = job_index or 0, job_count or 1, "--job-index/--job-count"
    else:
        index, count, source = 0, 1, "single worker"
        for idx_var, cnt_var, name in _ENV_SOURCES:
            if idx_var in env:
                index = int(env[idx_var])
                if idx_var == "SLURM_ARRAY_TASK_ID":
                    index -= int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
                if cnt_var not in env:
                    raise ValueError(f"{name}: {idx_var} is set but {cnt_var} is not; pass --job-count")
                count, source = int(env[cnt_var]), name
                break
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"job index {index} is not in [0, {count}) (from {source})")
    return index, count, source


def my_share(items: Sequence[T], index: int, count: int) -> list[T]:
    """Every ``count``-th item starting at ``index``: disjoint across indices, covering all."""
    return list(items[index::count])
