"""Every option of every command, declared once: name, type, default, help and choices.

The CLI's flags are generated from these dataclasses and YAML configs use the same keys, so adding
an option is one edit here. Each class's ``check()`` holds its cross-field rules; it runs when a
config is resolved (:func:`pipeline.config.resolve`) or checked in code (:func:`pipeline.config.checked`).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from typing import Any

from pipeline.config import option
from pipeline.errors import ConfigError

ON_ERROR = ("raise", "skip")
DEVICES = ("cpu", "cuda")
PROGRESS = ("auto", "bar", "log", "off")
PROGRESS_HELP = "progress display: auto (a bar on a terminal, plain log lines otherwise), bar, log or off"
ON_ERROR_HELP = "raise: stop at a bad sample, naming shard and key; skip: count and log it, then go on"
SHARDS_HELP = (
    "shard URLs: a path, brace pattern (train-{000000..000146}.tar), glob, fsspec URL (s3://...), "
    "pipe: command naming its .tar, or a shard index (.json: wids, or the sidecar pack writes; or one split "
    "of timm's webdataset layout, DIR/_info.json#train); "
    "plain or gzipped tars of samples (jpg/png/webp/tif/bmp/gif + .cls, or .json with --label-key); "
    "repeat the flag (or give a YAML list) for several"
)
LABEL_KEY_HELP = "read each sample's label from its .json under this key instead of its .cls"
TEACHER_PRETRAINED_HELP = (
    "load timm's pretrained weights of the teacher name (name.tag, e.g. regnety_160.deit_in1k) as timm does: "
    "from the Hugging Face hub's local cache, else a download (HF_HUB_OFFLINE, HF_HUB_CACHE respected); "
    "the SHA-256 of the file read is recorded like a checkpoint's"
)
LOG_TO = ("tensorboard", "wandb")  # each is also the package it needs and the extra that installs it
LOG_TO_HELP = (
    "also log scalars to TensorBoard and/or Weights & Biases, e.g. tensorboard,wandb (train-student: every line "
    "of metrics.jsonl, which stays the record; cache-teacher: its summary); W&B runs offline without an API key "
    "or with WANDB_MODE=offline; each needs the package of its name, which the stillroom extra of that name "
    "installs (docs/monitoring.md)"
)


def _positive(**values: float | None) -> None:
    """Refuse any given value below 1, naming its flag."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _not_negative(**values: float | None) -> None:
    for name, value in values.items():
        if value is not None and value < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {value}")


def _loggers_installed(log_to: list[str]) -> None:
    """Refuse a logger whose package is missing before any work (a run must not fail at its first line
    of metrics), naming the install that adds it. ``find_spec`` only looks: nothing is imported here."""
    for name in log_to:
        if importlib.util.find_spec(name) is None:
            install = f"pip install 'stillroom[{name}]'"
            raise ConfigError(f"--log-to {name} needs the {name} package, not installed: {install}")


def _required(**values: Any) -> None:
    missing = [f"--{name.replace('_', '-')}" for name, value in values.items() if not value]
    if missing:
        raise ConfigError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required")


@dataclass
class PackConfig:
    """Options of ``stillroom pack``."""

    source: str = option("", positional=True, help="'digits', an ImageFolder root, or a folder with classes.tsv")
    out: str = option("", positional=True, help="output folder for <prefix>-NNNNNN.tar shards and <prefix>.json")
    per_shard: int = option(1000, help="samples per shard")
    val_fraction: float = option(0.0, help="fraction of samples (by stable key hash) written as val-*.tar")
    prefix: str = option("train", help="shard name prefix of the training split")
    digits_size: int = option(32, help="side in pixels of the upscaled digits images")
    replace: bool = option(
        False,
        help="let a re-pack remove the files of this folder's earlier pack that it does not write again (shards "
        "past its new count; the --val-fraction split of a pack now without one); files no pack here wrote, and "
        "other splits' files, are never touched",
    )

    def check(self) -> None:
        _required(source=self.source, out=self.out)
        _positive(per_shard=self.per_shard, digits_size=self.digits_size)
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.val_fraction > 0 and self.prefix == "val":
            raise ConfigError("--prefix val clashes with the validation split of --val-fraction; choose another")


@dataclass
class CacheConfig:
    """Options of ``stillroom cache-teacher`` (phase 1)."""

    shards: list[str] = option(factory=list, help=SHARDS_HELP)
    label_key: str | None = option(None, help=LABEL_KEY_HELP)
    out: str = option("", help="cache location: a local path or fsspec URL of a zarr v3 group")
    like: str | None = option(
        None,
        help="another cache whose views this one caches for another teacher: its shards (unless --shards), "
        "recipe, seed, views, view blocks, capacity and classes are taken, so both hold targets for the same "
        "pixels, row for row (train-student can then combine them)",
    )
    teacher: str = option("regnety_160", help="timm model name of the teacher")
    teacher_checkpoint: str | None = option(None, help=".pth/.safetensors weights (timm or plain state dict)")
    teacher_pretrained: bool = option(False, help=TEACHER_PRETRAINED_HELP)
    teacher_kwargs: dict[str, Any] = option(factory=dict, help="extra timm.create_model arguments, as YAML")
    num_classes: int | None = option(
        None, help="number of classes (default: from the pack sidecar, else the teacher checkpoint's classifier)"
    )
    recipe: str | dict[str, Any] = option(
        "deit", help="augmentation recipe: deit (random views), eval (resize + center crop) or a YAML mapping"
    )
    img_size: int | None = option(None, help="view size in pixels (overrides the recipe's)")
    repeats: int | None = option(
        None,
        help="R, the repeated-augmentation copies train-student will use (DeiT: 3): mixing partners are "
        "drawn for it; --views must be a multiple (overrides the recipe's, default 1)",
    )
    views: int = option(10, help="V, views per sample in the cache")
    view_range: str | None = option(None, help="START:STOP, the views this job computes (on view-block edges)")
    view_block: int = option(5, help="B, views per unit of work (each image is decoded once per unit)")
    topk: int = option(10, help="K, logits kept per view (with --topk-mass: at most)")
    topk_mass: float | None = option(
        None,
        help="per-row K: keep the fewest logits whose probability at the largest cached temperature reaches "
        "this mass (e.g. 0.95), at least --topk-min and at most --topk; off: always K (docs/recipe.md)",
    )
    topk_min: int = option(1, help="with --topk-mass, never fewer logits per view than this")
    temperatures: list[float] = option(
        factory=lambda: [1.0, 3.0], help="temperatures whose logsumexp is stored (comma list)"
    )
    capacity: int | None = option(None, help="rows per shard (default: the largest shard)")
    seed: int = option(0, help="cache seed, part of every view's identity")
    batch_size: int = option(128, help="teacher batch size")
    workers: int = option(2, help="data loader worker processes")
    device: str = option("cpu", choices=DEVICES, help="where the teacher runs")
    compile: bool = option(False, help="torch.compile the teacher (CUDA)")
    job_index: int | None = option(None, help="this job's index (default: from torchrun/AWS Batch/K8s/Slurm)")
    job_count: int | None = option(None, help="number of jobs sharing the units")
    on_error: str = option("raise", choices=ON_ERROR, help=ON_ERROR_HELP)
    force_new: bool = option(
        False, help="replace an existing cache whose settings differ (one with the same settings is resumed)"
    )
    verify_done: bool = option(
        True,
        help="before computing, read back this job's finished units and check their checksums, redoing damaged "
        "ones (about 10 ms a unit on local disk); --no-verify-done only checks that their objects exist (a listing)",
    )
    progress: str = option("auto", choices=PROGRESS, help=PROGRESS_HELP)
    log_to: list[str] = option(factory=list, choices=LOG_TO, help=LOG_TO_HELP, metavar="NAME[,NAME]")

    def check(self) -> None:
        _required(out=self.out, **({} if self.like else {"shards": self.shards}))
        _loggers_installed(self.log_to)
        _positive(
            views=self.views,
            view_block=self.view_block,
            topk=self.topk,
            batch_size=self.batch_size,
            capacity=self.capacity,
            num_classes=self.num_classes,
            img_size=self.img_size,
            job_count=self.job_count,
            repeats=self.repeats,
        )
        _not_negative(workers=self.workers, job_index=self.job_index)
        if self.teacher_checkpoint and self.teacher_pretrained:
            raise ConfigError("--teacher-checkpoint and --teacher-pretrained: give one source of teacher weights")
        if not self.temperatures or any(not float(t) > 0 for t in self.temperatures):
            raise ConfigError(f"--temperatures must be one or more positive numbers, got {self.temperatures}")
        if self.topk_mass is not None and not 0.0 < self.topk_mass <= 1.0:
            raise ConfigError(f"--topk-mass must be in (0, 1], got {self.topk_mass}")
        if not 1 <= self.topk_min <= self.topk:
            raise ConfigError(f"--topk-min must be in [1, --topk {self.topk}], got {self.topk_min}")
        self.view_bounds()

    def view_bounds(self) -> tuple[int, int]:
        """The views ``[start, stop)`` this job computes (``--view-range``, else all)."""
        if not self.view_range:
            return 0, self.views
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", self.view_range)
        if not m:
            raise ConfigError(f"--view-range {self.view_range!r}: expected START:STOP")
        a, b = int(m.group(1)), int(m.group(2))
        edge = self.view_block
        if not (0 <= a < b <= self.views) or a % edge or (b % edge and b != self.views):
            raise ConfigError(f"--view-range {a}:{b} must lie in [0, {self.views}] on view-block ({edge}) edges")
        return a, b


@dataclass
class StatusConfig:
    """Options of ``stillroom cache-status``."""

    cache: list[str] = option(
        factory=list,
        positional=True,
        help="cache location; several caches made over the same views (cache-teacher --like) are also compared: "
        "their teachers' top-1 agreement and the KL between their soft targets",
    )

    def check(self) -> None:
        _required(cache=self.cache)


@dataclass
class VerifyConfig:
    """Options of ``stillroom verify-cache``."""

    cache: str = option("", positional=True, help="cache location")
    shards: list[str] = option(factory=list, help="the shards the cache was built from")
    label_key: str | None = option(None, help=LABEL_KEY_HELP)
    teacher_checkpoint: str = option(
        "",
        help="the teacher weights the cache was built with (not needed for a cache made with --teacher-pretrained: "
        "timm's weights are found again by name and their SHA-256 compared)",
    )
    samples: int | None = option(
        None,
        help="random (sample, view) pairs to replay and run the teacher on, one in every shard first "
        "(default: one per shard, at least 64)",
    )
    pixels: str = option(
        "all",
        choices=("all", "sampled"),
        help="whose replayed pixels are checked against the cache's digests: all (every image, in the view whose "
        "row holds its digest: every shard is decoded once) or sampled (only the views replayed for --samples)",
    )
    seed: int = option(0, help="seed of the random choice of pairs")
    device: str = option("cpu", choices=DEVICES, help="where the teacher runs")
    atol: float = option(0.05, help="largest allowed |cached - live| top-k logit")

    def check(self) -> None:
        _required(cache=self.cache, shards=self.shards)
        _positive(samples=self.samples)
        _not_negative(atol=self.atol)


@dataclass
class EvalConfig:
    """Options of ``stillroom evaluate``."""

    checkpoint: str = option("", help="checkpoint written by train-student")
    shards: list[str] = option(factory=list, help="validation shard URLs")
    label_key: str | None = option(None, help=LABEL_KEY_HELP)
    batch_size: int = option(256, help="batch size")
    workers: int = option(2, help="data loader worker processes")
    device: str = option("cpu", choices=DEVICES, help="where the model runs")
    ema: bool = option(False, help="evaluate the EMA weights")
    on_error: str = option("raise", choices=ON_ERROR, help=ON_ERROR_HELP)

    def check(self) -> None:
        _required(checkpoint=self.checkpoint, shards=self.shards)
        _positive(batch_size=self.batch_size)
        _not_negative(workers=self.workers)


@dataclass
class DemoConfig:
    """Options of ``stillroom demo``."""

    out: str = option("demo-out", help="working folder for shards, caches and checkpoints")
    size: str = option("full", choices=("full", "tiny"), help="full (~7 min on 2 cores) or tiny (a smoke run)")
    preset: str | None = option(
        None, help="demo preset YAML with one section per step (default: the installed demo preset, configs/demo.yaml)"
    )

    def check(self) -> None:
        _required(out=self.out)


@dataclass
class PresetsConfig:
    """Options of ``stillroom presets``."""

    name: str | None = option(None, help="print this preset (e.g. deit_small); without it, list them")
    copy_to: str | None = option(None, help="copy every preset into this folder (to edit them)")


@dataclass
class ReportConfig:
    """Options of ``stillroom report``."""

    run: list[str] = option(
        factory=list, metavar="FOLDER", help="a train-student output folder (its metrics.jsonl); repeat to overlay runs"
    )
    label: list[str] = option(
        factory=list, metavar="TEXT", help="the legend's name of each --run, in order; without it, each folder's name"
    )
    cache: str | None = option(None, help="a cache made by cache-teacher (a local path or fsspec URL)")
    out: str = option("pictures", help="folder the PNG pictures are written to")
    units: int = option(64, help="finished cache units read for the histograms, spread over the cache; 0: all")

    def check(self) -> None:
        if not self.run and not self.cache:
            raise ConfigError("--run or --cache is required: a training run's folder or a cache to draw")
        if self.label and len(self.label) != len(self.run):
            raise ConfigError(f"--label gives {len(self.label)} names for {len(self.run)} --run folder(s)")
        _required(out=self.out)
        _not_negative(units=self.units)
