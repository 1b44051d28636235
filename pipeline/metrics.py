"""Training metrics as JSON lines (``OUT/metrics.jsonl``), and a per-rank debug trace for tests."""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

from torch import nn


class MetricsLog:
    """One JSON object per line (``{"event": ..., "time": ..., ...}``), appended by the main rank."""

    def __init__(self, path: str, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, event: str, **fields: Any) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"event": event, "time": round(time.time(), 3), **fields}) + "\n")


class DebugTrace:
    """With ``STILLROOM_DEBUG_DIR`` set, each rank appends every step's sample keys and a digest of its
    parameters to ``rank<r>.jsonl``: how tests check DDP sharding and synchronisation."""

    def __init__(self, rank: int):
        folder = os.environ.get("STILLROOM_DEBUG_DIR")
        self.path = os.path.join(folder, f"rank{rank}.jsonl") if folder else None
        if folder:
            os.makedirs(folder, exist_ok=True)

    def record(self, model: nn.Module, **fields: Any) -> None:
        if self.path is None:
            return
        h = hashlib.sha256()
        for p in model.parameters():
            h.update(p.detach().cpu().numpy().tobytes())
        with open(self.path, "a") as f:
            f.write(json.dumps({**fields, "params_sha256": h.hexdigest()}) + "\n")
