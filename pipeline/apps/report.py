"""``stillroom report``: PNG pictures of training runs and of a cache, drawn from what is on disk.

No server and no display: TensorBoard and W&B (``--log-to``) are for watching runs live; these pictures
are files that a batch job, a README or a review can carry. Runs are drawn by :mod:`pipeline.apps.report_runs`
from their ``metrics.jsonl``, a cache by :mod:`pipeline.apps.report_cache` through :mod:`pipeline.cache`.
"""

from __future__ import annotations

import os

from pipeline.apps.report_cache import cache_pictures
from pipeline.apps.report_runs import runs_picture
from pipeline.config import checked
from pipeline.files import writable_folder
from pipeline.options import ReportConfig


def report(cfg: ReportConfig) -> list[str]:
    """Draw every picture ``cfg`` asks for into ``cfg.out``; returns the paths written.

    Raises:
        ConfigError: a ``--run`` folder without ``metrics.jsonl``. CacheError, StorageError: as any read of
            the cache (a missing cache, an unreadable store).
    """
    cfg = checked(cfg)
    writable_folder(cfg.out, "--out")
    paths = []
    if cfg.run:
        labels = cfg.label or [os.path.basename(os.path.abspath(r)) for r in cfg.run]
        paths.append(runs_picture(cfg.run, labels, os.path.join(cfg.out, "runs.png")))
    if cfg.cache:
        paths += cache_pictures(cfg.cache, cfg.out, cfg.units)
    return paths
