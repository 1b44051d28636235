"""Shared fixtures: small real data (scikit-learn digits, the ImageNet sample) and tiny models."""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_SAMPLE = ROOT.parent / "shared" / "data" / "imagenet-sample"
sys.path.insert(0, str(ROOT))

from pipeline.pack import _write_split, digits_items  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY_STUDENT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}


def write_digits_shards(out: Path, n: int, per_shard: int, prefix: str = "train", offset: int = 0) -> str:
    """Pack ``n`` digits (starting at ``offset``) into ``out/<prefix>-*.tar``; return the brace pattern."""
    classes, items = digits_items(32)
    chosen = list(itertools.islice(items, offset, offset + n))
    meta = _write_split(chosen, str(out), prefix, per_shard, classes)
    return str(out / meta["pattern"])


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """120 real digits in 3 shards of 40 (pattern string)."""
    return write_digits_shards(tmp_path_factory.mktemp("digits"), 120, 40)


@pytest.fixture(scope="session")
def digits_val_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_digits_shards(tmp_path_factory.mktemp("digits-val"), 60, 30, prefix="val", offset=1000)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A randomly initialised regnetx_002 for 10 classes, saved as a plain state dict."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("regnetx_002", num_classes=10)
    path = tmp_path_factory.mktemp("teacher") / "regnetx_002.pth"
    torch.save(model.state_dict(), path)
    return str(path)
