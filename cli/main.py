"""``stillroom``: pack shards, cache a teacher, train a student, inspect and verify caches.

Every command that takes ``--config FILE`` reads YAML with the same key names as its flags
(``view_block`` or ``view-block``); flags given on the command line override the file.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import typer

from pipeline.config import ConfigError, resolve, write_resolved

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)


def _setup_logging(verbose: bool = False) -> None:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    prefix = f"[rank {rank}] " if world > 1 else ""
    level = logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING)
    logging.basicConfig(
        level=level, format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True
    )


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg="red", err=True)
    raise typer.Exit(2)


def _known_errors() -> tuple[type[Exception], ...]:
    from pipeline.cache import CacheError
    from pipeline.models import CheckpointError
    from pipeline.shards import DataError

    return (ConfigError, CacheError, CheckpointError, DataError, ValueError, FileNotFoundError)


def _print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=1, default=str))


@app.command()
def pack(
    source: str = typer.Argument(..., help="'digits', an ImageFolder root, or a folder with classes.tsv"),
    out: str = typer.Argument(..., help="output directory for <prefix>-NNNNNN.tar shards + <prefix>.json"),
    per_shard: int = typer.Option(1000, help="samples per shard"),
    val_fraction: float = typer.Option(0.0, help="fraction of samples (by stable key hash) written as val-*.tar"),
    prefix: str = typer.Option("train", help="shard name prefix of the training split"),
    digits_size: int = typer.Option(32, help="side in pixels of the upscaled digits images"),
) -> None:
    """Pack images into webdataset shards with stable keys and a JSON sidecar."""
    from pipeline.pack import pack as do_pack

    try:
        meta = do_pack(source, out, per_shard, val_fraction, prefix, digits_size)
    except _known_errors() as e:
        _fail(e)
    for split, m in meta.items():
        typer.echo(f"{split}: {m['num_samples']} samples in {len(m['shards'])} shards -> {out}/{m['pattern']}")


@app.command("cache-teacher")
def cache_teacher(
    shards: str = typer.Option(None, help="shard URLs: brace pattern, glob, list, fsspec or pipe: URL"),
    out: str = typer.Option(None, help="cache location (zarr v3 group; local path or fsspec URL)"),
    teacher: str = typer.Option(None, help="timm model name (default regnety_160)"),
    teacher_checkpoint: str = typer.Option(None, help=".pth/.safetensors weights (timm or plain state dict)"),
    teacher_pretrained: bool = typer.Option(None, help="load timm pretrained weights (needs a model hub)"),
    num_classes: int = typer.Option(None, help="classes (default: from the pack sidecar)"),
    recipe: str = typer.Option(None, help="deit (random views) or eval (resize + center crop)"),
    img_size: int = typer.Option(None, help="view size in pixels (overrides the recipe's)"),
    views: int = typer.Option(None, help="V, number of views per sample in the cache"),
    view_range: str = typer.Option(None, help="START:STOP, the views this job computes (on view-block edges)"),
    view_block: int = typer.Option(None, help="B, views per unit (each image is decoded once per unit)"),
    topk: int = typer.Option(None, help="K, logits kept per view"),
    temperatures: str = typer.Option(None, help="comma list of temperatures whose logsumexp is stored"),
    capacity: int = typer.Option(None, help="rows per shard (default: the largest shard)"),
    seed: int = typer.Option(None, help="cache seed (part of every view's identity)"),
    batch_size: int = typer.Option(None, help="teacher batch size"),
    workers: int = typer.Option(None, help="data loader worker processes"),
    device: str = typer.Option(None, help="cpu or cuda"),
    compile: bool = typer.Option(None, help="torch.compile the teacher (CUDA)"),
    job_index: int = typer.Option(None, help="this job's index (default: from torchrun/AWS Batch/K8s/Slurm env)"),
    job_count: int = typer.Option(None, help="number of jobs sharing the units"),
    on_error: str = typer.Option(None, help="raise (default) or skip bad samples (counted and logged)"),
    force_new: bool = typer.Option(
        None, help="replace an existing cache whose settings differ (one with the same fingerprint is resumed)"
    ),
    progress: bool = typer.Option(None, help="show a progress bar"),
    config: str = typer.Option(None, "--config", help="YAML file with any of these options"),
) -> None:
    """Phase 1: run the teacher over replayed views and store top-k logits (resumable)."""
    overrides = {k: v for k, v in locals().items() if k != "config"}
    from pipeline.cache_teacher import CacheConfig, run

    _setup_logging()
    try:
        cfg = resolve(CacheConfig, config, overrides)
        if not cfg.shards or not cfg.out:
            raise ConfigError("--shards and --out are required (on the command line or in --config)")
        summary = run(cfg)
    except _known_errors() as e:
        _fail(e)
    skipped = sum(summary["skipped_samples"].values())
    typer.echo(
        f"cache-teacher: {summary['units_done']} units done, {summary['units_skipped']} skipped (already done), "
        f"{summary['images']} image decodes, {summary['views']} views, {skipped} bad samples skipped, "
        f"{summary['bytes_written']} bytes written, {summary['wall_s']:.1f}s"
    )


@app.command("cache-status")
def cache_status(cache: str = typer.Argument(..., help="cache location")) -> None:
    """Units done/missing, bytes per (sample, view), teacher agreement with labels."""
    from pipeline.cache_tools import status

    try:
        _print_json(status(cache))
    except _known_errors() as e:
        _fail(e)


@app.command("verify-cache")
def verify_cache(
    cache: str = typer.Argument(..., help="cache location"),
    shards: str = typer.Option(..., help="the shards the cache was built from"),
    teacher_checkpoint: str = typer.Option(..., help="the teacher weights the cache was built with"),
    samples: int = typer.Option(64, help="random (sample, view) pairs to re-run"),
    seed: int = typer.Option(0, help="seed of the random choice"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    atol: float = typer.Option(0.05, help="largest allowed |cached - live| top-k logit"),
) -> None:
    """Re-run the teacher on random replayed views; exit 1 if the cache disagrees."""
    from pipeline.cache_tools import verify

    _setup_logging()
    try:
        report = verify(cache, shards, teacher_checkpoint, samples, seed, device, atol)
    except _known_errors() as e:
        _fail(e)
    _print_json(report)
    if not report["ok"]:
        raise typer.Exit(1)


@app.command("train-student")
def train_student(
    shards: str = typer.Option(None, help="training shard URLs"),
    val_shards: str = typer.Option(None, help="validation shard URLs"),
    cache: str = typer.Option(None, help="teacher cache from cache-teacher"),
    model: str = typer.Option(None, help="timm student (default deit_small_distilled_patch16_224)"),
    num_classes: int = typer.Option(None, help="classes (default: cache or pack sidecar)"),
    distillation: str = typer.Option(None, help="none, hard or soft"),
    alpha: float = typer.Option(None, help="weight of the distillation loss"),
    tau: float = typer.Option(None, help="soft distillation temperature (must be cached)"),
    teacher_mode: str = typer.Option(None, help="cached (read the cache) or live (run the teacher)"),
    teacher: str = typer.Option(None, help="live teacher timm name"),
    teacher_checkpoint: str = typer.Option(None, help="live teacher weights"),
    recipe: str = typer.Option(None, help="augmentation recipe (default: the cache's)"),
    img_size: int = typer.Option(None, help="view size (overrides the recipe's)"),
    epochs: int = typer.Option(None, help="epochs"),
    batch_size: int = typer.Option(None, help="per-rank batch size"),
    accum_steps: int = typer.Option(None, help="gradient accumulation steps"),
    lr: float = typer.Option(None, help="learning rate for a global batch of 512 (scaled linearly)"),
    warmup_epochs: int = typer.Option(None, help="linear warmup epochs"),
    weight_decay: float = typer.Option(None, help="AdamW weight decay"),
    clip_grad: float = typer.Option(None, help="gradient norm clipping"),
    drop_path: float = typer.Option(None, help="stochastic depth rate"),
    model_ema: bool = typer.Option(None, help="keep an EMA of the weights"),
    amp: bool = typer.Option(None, help="bf16 autocast on CUDA"),
    workers: int = typer.Option(None, help="data loader workers per rank"),
    eval_every: int = typer.Option(None, help="evaluate every N epochs"),
    checkpoint_every: int = typer.Option(None, help="also checkpoint every N steps (mid-epoch resume)"),
    max_steps_per_epoch: int = typer.Option(None, help="cap steps per epoch (smoke tests, benchmarks)"),
    out: str = typer.Option(None, help="output directory (checkpoints, metrics.jsonl, resolved config)"),
    resume: bool = typer.Option(None, help="continue from OUT/last.pth"),
    device: str = typer.Option(None, help="cpu or cuda"),
    seed: int = typer.Option(None, help="seed (default: the cache's)"),
    on_error: str = typer.Option(None, help="raise or skip bad samples"),
    progress: bool = typer.Option(None, help="show a progress bar"),
    config: str = typer.Option(None, "--config", help="YAML file with any of these options"),
) -> None:
    """Phase 2: train a DeiT student from cached teacher targets (runs under torchrun too)."""
    overrides = {k: v for k, v in locals().items() if k != "config"}
    from pipeline.train import TrainConfig, train

    _setup_logging()
    try:
        cfg = resolve(TrainConfig, config, overrides)
        if not cfg.shards:
            raise ConfigError("--shards is required (on the command line or in --config)")
        if int(os.environ.get("RANK", "0")) == 0:
            write_resolved(cfg, cfg.out)
        result = train(cfg)
    except _known_errors() as e:
        _fail(e)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(json.dumps({"final": result}))


@app.command()
def evaluate(
    checkpoint: str = typer.Option(..., help="checkpoint written by train-student"),
    shards: str = typer.Option(..., help="validation shard URLs"),
    batch_size: int = typer.Option(256, help="batch size"),
    workers: int = typer.Option(2, help="data loader workers"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    ema: bool = typer.Option(False, help="evaluate the EMA weights"),
) -> None:
    """Top-1/top-5 of the class head, the distillation head and their average."""
    from pipeline.evaluate import evaluate_checkpoint

    _setup_logging()
    try:
        _print_json(evaluate_checkpoint(checkpoint, shards, batch_size, workers, device, ema))
    except _known_errors() as e:
        _fail(e)


@app.command()
def demo(
    out: str = typer.Option("demo-out", help="working directory for shards, caches, checkpoints"),
    size: str = typer.Option("full", help="full (~5 min on 2 cores) or tiny (a smoke run for tests)"),
    config: str = typer.Option(None, "--config", help="demo preset YAML (default configs/demo.yaml)"),
) -> None:
    """Both phases end to end on the digits set shipped with scikit-learn; prints one table."""
    from pipeline.demo import run_demo

    _setup_logging()
    try:
        run_demo(out, size, config)
    except _known_errors() as e:
        _fail(e)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
