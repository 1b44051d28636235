"""Which share of the work this process does: explicit flags, else the batch system's environment.

Units are split by striding a deterministic list, so any (index, count) pair gets a disjoint
share and all shares together cover every unit exactly once.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TypeVar

from pipeline.errors import ConfigError

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
    at ``SLURM_ARRAY_TASK_MIN``; they are shifted to start at 0. ``torchrun`` inside an array job
    combines both: slot ``task * WORLD_SIZE + RANK`` of ``tasks * WORLD_SIZE``.
    """
    env = os.environ if env is None else env
    if job_index is None and job_count is not None:
        # --job-count alone (e.g. a Kubernetes pod, which only knows JOB_COMPLETION_INDEX): the index
        # still comes from the batch system, else every job would take share 0.
        for idx_var, _, _ in _ENV_SOURCES:
            if idx_var in env:
                slurm_min = _int_var(env, "SLURM_ARRAY_TASK_MIN") if idx_var == "SLURM_ARRAY_TASK_ID" else 0
                job_index = _int_var(env, idx_var) - slurm_min
                break
    if job_index is not None or job_count is not None:
        index, count, source = job_index or 0, job_count or 1, "--job-index/--job-count"
    else:
        index, count, source = 0, 1, "single worker"
        found = []
        for idx_var, cnt_var, name in _ENV_SOURCES:
            if idx_var in env:
                i = _int_var(env, idx_var)
                if idx_var == "SLURM_ARRAY_TASK_ID":
                    i -= _int_var(env, "SLURM_ARRAY_TASK_MIN")
                if cnt_var not in env:
                    raise ConfigError(f"{name}: {idx_var} is set but {cnt_var} is not; pass --job-count")
                found.append((i, _int_var(env, cnt_var), name))
        if found:
            # torchrun inside an array job: each array task's ranks share that task's slice, so the
            # slot is (task, rank) flattened; otherwise every task would redo the same share.
            index, count, source = found[0]
            for i, n, name in found[1:2]:
                index, count, source = i * count + index, n * count, f"{name} x {source}"
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"job index {index} is not in [0, {count}) (from {source})")
    return index, count, source


def _int_var(env: Mapping[str, str], name: str) -> int:
    """An environment variable that must hold a whole number (0 when unset), refused by name otherwise."""
    value = env.get(name, "0")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(
            f"${name} is {value!r}, not a whole number (it says which share of the work this job takes)"
        ) from None


def my_share(items: Sequence[T], index: int, count: int) -> list[T]:
    """Every ``count``-th item starting at ``index``: disjoint across indices, covering all."""
    return list(items[index::count])
