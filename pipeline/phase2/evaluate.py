"""Evaluation: top-1/top-5 of the class head, the distillation head and their average (as DeiT
reports all three), or of a one-head model's only head, on validation shards through the deterministic
evaluation recipe: each rank reads its share of whole shards, in order, and the counts are summed."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import checked
from pipeline.errors import CheckpointError
from pipeline.interrupt import close_loader, fetch, worker_signals
from pipeline.models.build import Normalized, autocast, create, resolve_device
from pipeline.options import EvalConfig
from pipeline.phase2 import checkpoint as ckpt
from pipeline.phase2.distributed import Dist, all_sum
from pipeline.shards.decode import iter_decoded
from pipeline.shards.lists import ShardInfo, check_same_classes, class_names, load_shard_list
from pipeline.shards.samples import OnError
from pipeline.views.deal import CHUNK
from pipeline.views.pixels import join_batches, stack_views
from pipeline.views.recipe import Recipe, eval_recipe
from pipeline.views.replay import View, mixed_views


def head_logits(model: nn.Module, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits of each head. A distilled DeiT gives ``cls``, ``dist`` and their average ``avg``."""
    inner = model.net if isinstance(model, Normalized) else model
    if hasattr(inner, "head_dist"):
        x = model.normalize(pixels) if isinstance(model, Normalized) else pixels
        feats = inner.forward_features(x)
        cls, dist = inner.head(feats[:, 0]), inner.head_dist(feats[:, 1])
        return {"cls": cls, "dist": dist, "avg": (cls + dist) / 2}
    return {"avg": model(pixels)}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    shards: list[ShardInfo],
    img_size: int,
    num_classes: int,
    device: torch.device,
    d: Dist,
    batch_size: int = 256,
    workers: int = 2,
    crop_pct: float = 0.875,
    on_error: OnError = "raise",
) -> dict[str, Any]:
    """Top-1/top-5 (percent) per head over all ranks' shares of ``shards``.

    ``heads`` is 2 for a distilled model (``top1_cls``, ``top1_dist`` and their average ``top1_avg``, as
    DeiT reports) and 1 for any other (its only head's, under ``top1_avg``: the key train-student picks
    ``best.pth`` by, whatever the model). ``on_error`` is the run's bad-sample policy: a skipped
    validation sample is counted and logged, and left out of the accuracy's denominator.
    """
    was_training = model.training
    model.eval()
    recipe = dataclasses.replace(eval_recipe(img_size), crop_pct=crop_pct)
    ids = list(range(len(shards)))[d.rank :: d.world]
    names = ("cls", "dist", "avg")
    counts = torch.zeros(1 + 2 * len(names), dtype=torch.float64, device=device)
    for batch in eval_batches(shards, ids, recipe, num_classes, on_error, batch_size, workers) if ids else []:
        pixels = batch["pixels"].to(device)
        label = batch["label"].to(device)
        with autocast(device):
            heads = head_logits(model, pixels)
        counts[0] += label.numel()
        for i, name in enumerate(names):
            if name in heads:
                top5 = heads[name].float().topk(min(5, num_classes), dim=-1).indices
                counts[1 + 2 * i] += (top5[:, 0] == label).sum()
                counts[2 + 2 * i] += (top5 == label[:, None]).any(dim=-1).sum()
    all_sum(counts, d)
    model.train(was_training)
    n = max(float(counts[0]), 1.0)
    distilled = hasattr(model.net if isinstance(model, Normalized) else model, "head_dist")
    out: dict[str, Any] = {"samples": int(counts[0]), "heads": 2 if distilled else 1}
    for i, name in enumerate(names):
        if name == "avg" or distilled:
            out[f"top1_{name}"] = round(100.0 * float(counts[1 + 2 * i]) / n, 3)
            out[f"top5_{name}"] = round(100.0 * float(counts[2 + 2 * i]) / n, 3)
    return out


def evaluate_checkpoint(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate a ``train-student`` checkpoint; the model is rebuilt from the metadata it carries."""
    cfg = checked(cfg)
    state = ckpt.load(cfg.checkpoint)
    meta = state.get("model_meta")
    if not meta:
        raise CheckpointError(f"checkpoint {cfg.checkpoint!r} has no model_meta: not written by train-student")
    model = create(meta["name"], int(meta["num_classes"]), **meta.get("kwargs", {}))
    weights = state["ema"] if cfg.ema else state["model"]
    if weights is None:
        raise CheckpointError(f"checkpoint {cfg.checkpoint!r} holds no EMA weights")
    model.load_state_dict(weights)
    val_classes = class_names(cfg.shards)
    if meta.get("classes") and val_classes:
        check_same_classes(meta["classes"], val_classes, f"--shards {cfg.shards[0]!r}")
    device = resolve_device(cfg.device)
    wrapped = Normalized(model, tuple(meta["mean"]), tuple(meta["std"])).to(device)
    result = evaluate(
        wrapped,
        load_shard_list(cfg.shards, label_key=cfg.label_key),
        int(meta["img_size"]),
        int(meta["num_classes"]),
        device,
        Dist(),
        cfg.batch_size,
        cfg.workers,
        float(meta.get("crop_pct", 0.875)),
        cfg.on_error,  # type: ignore[arg-type]
    )
    if result["heads"] == 1:  # one head (a ResNet, a RegNet...): its top-1/top-5, not an "average" of one
        result = {"samples": result["samples"], "heads": 1, "top1": result["top1_avg"], "top5": result["top5_avg"]}
    return {"checkpoint": cfg.checkpoint, "epoch": state.get("epoch"), "model": meta["name"], **result}


class EvalStream(IterableDataset):
    """Evaluation views of whole shards (no mixing, no cache), in order, ``CHUNK`` at a time."""

    def __init__(self, shards: list[ShardInfo], ids: list[int], recipe: Recipe, num_classes: int, on_error: OnError):
        self.shards, self.ids, self.recipe, self.num_classes, self.on_error = shards, ids, recipe, num_classes, on_error

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        ids = self.ids[info.id :: info.num_workers] if info else self.ids
        for i in ids:
            shard = self.shards[i]
            pending: list[View] = []
            for s in iter_decoded(shard, i, self.num_classes, self.on_error):
                pending += mixed_views([s], 0, self.recipe, 0, shard.name, shard.count)
                if len(pending) >= CHUNK:
                    yield _eval_chunk(pending)
                    pending = []
            if pending:
                yield _eval_chunk(pending)


def _eval_chunk(views: list[View]) -> dict[str, Any]:
    return {
        "pixels": stack_views([v.pixels for v in views]),
        "label": torch.tensor([v.label for v in views]),
        "keys": [v.key for v in views],
    }


def eval_batches(
    shards: list[ShardInfo],
    ids: list[int],
    recipe: Recipe,
    num_classes: int,
    on_error: OnError,
    batch_size: int,
    workers: int,
) -> Iterator[dict[str, Any]]:
    """All evaluation samples of the shards ``ids``, in batches of at most ``batch_size``."""
    workers = min(workers, len(ids))
    loader = DataLoader(
        EvalStream(shards, ids, recipe, num_classes, on_error),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        worker_init_fn=worker_signals,
    )
    held: list[dict[str, Any]] = []
    size = 0
    chunks, end = iter(loader), None
    try:
        while (chunk := fetch(chunks, end)) is not end:
            held.append(chunk)
            size += len(chunk["keys"])
            if size >= batch_size:
                joined = _join_chunks(held)
                while len(joined["keys"]) >= batch_size:
                    yield _rows(joined, 0, batch_size)
                    joined = _rows(joined, batch_size, len(joined["keys"]))
                held, size = [joined], len(joined["keys"])
    finally:  # ended, failed or stopped: the workers go now
        close_loader(chunks)
    if size:
        yield _join_chunks(held)


def _join_chunks(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "pixels": join_batches([c["pixels"] for c in chunks]),
        "label": torch.cat([c["label"] for c in chunks]),
        "keys": [k for c in chunks for k in c["keys"]],
    }


def _rows(batch: dict[str, Any], a: int, b: int) -> dict[str, Any]:
    return {"pixels": batch["pixels"][a:b], "label": batch["label"][a:b], "keys": batch["keys"][a:b]}
