"""Evaluation: top-1/top-5 of the class head, the distillation head and their average (as DeiT
reports all three), on validation shards through the deterministic evaluation recipe."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from . import checkpoint as ckpt
from .config import checked
from .data import StreamSpec, eval_batches
from .distributed import Dist, all_sum
from .errors import CheckpointError
from .models import Normalized, autocast, create, resolve_device
from .options import EvalConfig
from .recipe import eval_recipe
from .samplers import epoch_plan
from .samples import OnError
from .shards import ShardInfo, check_same_classes, class_names, load_shard_list


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

    ``on_error`` is the run's bad-sample policy: a skipped validation sample is counted and logged,
    and left out of the accuracy's denominator.
    """
    was_training = model.training
    model.eval()
    recipe = dataclasses.replace(eval_recipe(img_size), crop_pct=crop_pct)
    ids = list(range(len(shards)))[d.rank :: d.world]
    spec = StreamSpec(
        shards=shards,
        shard_ids=ids,
        cache_shards=None,
        cache_url=None,
        plan=epoch_plan(0, 1, 1),
        recipe=recipe,
        seed=0,
        num_classes=num_classes,
        on_error=on_error,
    )
    names = ("cls", "dist", "avg")
    counts = torch.zeros(1 + 2 * len(names), dtype=torch.float64, device=device)
    for batch in eval_batches(spec, batch_size, workers) if ids else []:
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
    out: dict[str, Any] = {"samples": int(counts[0])}
    for i, name in enumerate(names):
        if name == "avg" or hasattr(model.net if isinstance(model, Normalized) else model, "head_dist"):
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
    return {"checkpoint": cfg.checkpoint, "epoch": state.get("epoch"), **result}
