"""Options of ``stillroom train-student`` (phase 2), declared once, in sections.

Each section is a dataclass of its own (data, teacher and cache, model, optimisation, distillation, run
control, logging) whose ``PANEL`` titles its group in ``--help``; :class:`TrainConfig` inherits them all, so
code reads ``cfg.lr`` and YAML files and flags keep their flat names (``lr: 5e-4``, ``--lr``).

Every option declares what a new value does to a run on ``--resume`` (``on_resume``, one of :data:`ROLES`), so
that a new option cannot be added without saying whether it changes what is trained;
:mod:`pipeline.phase2.identity` records and checks them, and ``tests/test_resume_identity.py`` fails on an
option that declares none.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

from pipeline.config import option
from pipeline.errors import ConfigError
from pipeline.options import (
    DEVICES,
    LABEL_KEY_HELP,
    LOG_TO,
    LOG_TO_HELP,
    ON_ERROR,
    ON_ERROR_HELP,
    PROGRESS,
    PROGRESS_HELP,
    SHARDS_HELP,
    TEACHER_PRETRAINED_HELP,
    _loggers_installed,
    _not_negative,
    _positive,
    _required,
)

# What a new value of an option does to a run on --resume.
RUN = "run"  # what the run is (data, views, model, seeds): a run with another value is another run; refused
TRAINING = "training"  # changes the weights trained (optimiser, schedule, loss, regularisation, EMA): refused
# unless --allow-change names it, then logged and recorded
STREAM = "stream"  # which samples a step holds: refused mid-epoch; at an epoch end only the global batch must stay
FREE = "free"  # changes no weight (logging, evaluation, hardware, where files go): any value on any resume
ROLES = (RUN, TRAINING, STREAM, FREE)


@dataclass
class TrainData:
    """The shards a run trains and validates on, and how their views are made."""

    PANEL: ClassVar[str] = "Data"

    shards: list[str] = option(factory=list, on_resume=RUN, help=SHARDS_HELP)
    val_shards: list[str] = option(factory=list, on_resume=FREE, help="validation shard URLs (same forms as --shards)")
    label_key: str | None = option(None, on_resume=RUN, help=LABEL_KEY_HELP)
    recipe: str | dict[str, Any] | None = option(
        None, on_resume=RUN, help="augmentation recipe (default: the cache's, else deit)"
    )
    img_size: int | None = option(None, on_resume=RUN, help="view size in pixels (overrides the recipe's)")
    repeats: int | None = option(
        None,
        on_resume=RUN,
        help="copies of each trained sample per epoch, each with its own view (DeiT's repeated augmentation; "
        "an epoch then covers 1/R of the samples in as many steps); 1 or the cache's (default: the cache's, else 1)",
    )
    seed: int | None = option(
        None, on_resume=RUN, help="seed of the views and of training (default: the cache's, else 0)"
    )
    on_error: str = option("raise", choices=ON_ERROR, on_resume=FREE, help=ON_ERROR_HELP)


@dataclass
class TrainTeacher:
    """Where the teacher's targets come from: caches, or a teacher run in the loop."""

    PANEL: ClassVar[str] = "Teacher and cache"

    cache: list[str] = option(
        factory=list,
        on_resume=RUN,
        help="teacher cache made by cache-teacher; repeat the flag (or give a YAML list) to distil from several "
        "teachers cached over the same views (cache-teacher --like CACHE)",
    )
    teacher_weights: list[float] = option(
        factory=list,
        on_resume=TRAINING,
        help="weight of each cache's teacher in their combination (comma list; default: equal)",
    )
    teacher_mode: str = option(
        "cached",
        choices=("cached", "live"),
        on_resume=TRAINING,
        help="cached: read the cache; live: run the teacher in the loop",
    )
    teacher: list[str] = option(
        factory=list,
        on_resume=RUN,
        help="timm name of each live teacher (default: each cache's teacher); repeat for several",
    )
    teacher_checkpoint: list[str] = option(
        factory=list,
        on_resume=RUN,
        help="weights of each live teacher, in the order of --cache (or of --teacher); repeat for several",
    )
    teacher_pretrained: bool = option(
        False,
        on_resume=RUN,
        help=f"live mode without a cache: {TEACHER_PRETRAINED_HELP} (a cache says which weights it holds)",
    )
    teacher_kwargs: dict[str, Any] = option(
        factory=dict, on_resume=RUN, help="extra timm.create_model arguments of the teacher"
    )
    topk: int = option(10, on_resume=RUN, help="K of the live teacher's targets when there is no cache")
    temperatures: list[float] = option(
        factory=lambda: [1.0, 3.0],
        on_resume=RUN,
        help="temperatures of the live teacher's targets when there is no cache",
    )


@dataclass
class TrainModel:
    """The student."""

    PANEL: ClassVar[str] = "Model"

    model: str = option("deit_small_distilled_patch16_224", on_resume=RUN, help="timm model name of the student")
    model_kwargs: dict[str, Any] = option(
        factory=dict, on_resume=RUN, help="extra timm.create_model arguments, as YAML"
    )
    num_classes: int | None = option(
        None, on_resume=RUN, help="number of classes (default: from the cache or pack sidecar)"
    )
    drop_path: float = option(0.1, on_resume=TRAINING, help="stochastic depth rate")
    model_ema: bool = option(False, on_resume=TRAINING, help="keep an exponential moving average of the weights")
    model_ema_decay: float = option(0.99996, on_resume=TRAINING, help="decay of the weights' moving average")


@dataclass
class TrainOptimisation:
    """DeiT's AdamW, schedule and batch."""

    PANEL: ClassVar[str] = "Optimisation"

    epochs: int = option(300, on_resume=TRAINING, help="epochs")
    batch_size: int = option(64, on_resume=STREAM, help="batch size per rank")
    accum_steps: int = option(1, on_resume=STREAM, help="gradient accumulation steps")
    lr: float = option(5e-4, on_resume=TRAINING, help="learning rate for a global batch of 512 (scaled linearly)")
    min_lr: float = option(1e-5, on_resume=TRAINING, help="final learning rate of the cosine schedule")
    warmup_lr: float = option(1e-6, on_resume=TRAINING, help="learning rate at the start of the warmup")
    warmup_epochs: int = option(5, on_resume=TRAINING, help="linear warmup epochs")
    weight_decay: float = option(0.05, on_resume=TRAINING, help="AdamW weight decay")
    clip_grad: float | None = option(None, on_resume=TRAINING, help="gradient norm clipping (off by default)")


@dataclass
class TrainDistillation:
    """DeiT's loss: which target the distillation head learns, and its weight."""

    PANEL: ClassVar[str] = "Distillation"

    distillation: str = option(
        "hard",
        choices=("none", "hard", "soft"),
        on_resume=RUN,
        help="hard: the distillation head learns the teacher's argmax; soft: its distribution at --tau; "
        "none: no teacher, the class head learns the labels and the distillation head gets no loss (as DeiT)",
    )
    alpha: float = option(0.5, on_resume=TRAINING, help="weight of the distillation loss, in [0, 1]")
    tau: float = option(1.0, on_resume=TRAINING, help="soft distillation temperature (must be a cached one)")


@dataclass
class TrainRunControl:
    """Where the run writes, how it resumes, what it runs on."""

    PANEL: ClassVar[str] = "Run control"

    out: str = option(
        "runs/student", on_resume=FREE, help="output folder: checkpoints, metrics.jsonl, resolved-config.yaml"
    )
    resume: bool = option(False, on_resume=FREE, help="continue from OUT/last.pth")
    allow_change: list[str] = option(
        factory=list,
        on_resume=FREE,
        metavar="OPTION[,OPTION]",
        help="with --resume: continue with new values of these options that change what is trained (lr, epochs, "
        "alpha...), each logged in metrics.jsonl; any other change is refused",
    )
    force_new: bool = option(
        False,
        on_resume=FREE,
        help="start a new run in an OUT that holds one: its files are moved to OUT/replaced-<time>/ first",
    )
    run_seed: int | None = option(
        None,
        on_resume=RUN,
        help="seed of the student's initial weights, drop-path noise and batch order only (default: --seed): "
        "repeat a run with other randomness on the same cached views",
    )
    device: str = option("cpu", choices=DEVICES, on_resume=FREE, help="where the student (and a live teacher) run")
    amp: bool = option(True, on_resume=TRAINING, help="bf16 autocast on CUDA")
    compile: bool = option(
        False, on_resume=FREE, help="torch.compile the student (as timm's --torchcompile); off by default"
    )
    deterministic: bool = option(False, on_resume=FREE, help="torch.use_deterministic_algorithms (tests, debugging)")
    workers: int = option(2, on_resume=STREAM, help="data loader worker processes per rank")
    shuffle_buffer: int = option(
        2048,
        on_resume=STREAM,
        help="views held for shuffling between shards (2048 x 224 px views: 300 MB uint8, 600 MB float16)",
    )
    eval_every: int = option(1, on_resume=FREE, help="evaluate every N epochs (and after the last); 0: never")
    eval_batch_size: int = option(256, on_resume=FREE, help="evaluation batch size")
    checkpoint_every: int = option(
        0, on_resume=FREE, help="also checkpoint every N steps (mid-epoch resume); 0: epoch ends only"
    )
    max_steps_per_epoch: int | None = option(
        None, on_resume=TRAINING, help="cap the steps of each epoch (smoke tests, benchmarks)"
    )


@dataclass
class TrainLogging:
    """What the run reports, and where."""

    PANEL: ClassVar[str] = "Logging"

    log_every: int = option(20, on_resume=FREE, help="steps between train lines in metrics.jsonl")
    progress: str = option("auto", choices=PROGRESS, on_resume=FREE, help=PROGRESS_HELP)
    log_to: list[str] = option(factory=list, choices=LOG_TO, on_resume=FREE, help=LOG_TO_HELP, metavar="NAME[,NAME]")


@dataclass
class TrainConfig(
    TrainLogging, TrainRunControl, TrainDistillation, TrainOptimisation, TrainModel, TrainTeacher, TrainData
):
    """Options of ``stillroom train-student`` (phase 2). Defaults are DeiT's."""

    @property
    def cached(self) -> bool:
        """Targets come from the cache (distillation with a cached teacher)."""
        return self.distillation != "none" and self.teacher_mode == "cached"

    @property
    def live(self) -> bool:
        return self.distillation != "none" and self.teacher_mode == "live"

    def check(self) -> None:
        _required(shards=self.shards, out=self.out)
        _loggers_installed(self.log_to)
        _positive(
            epochs=self.epochs,
            batch_size=self.batch_size,
            accum_steps=self.accum_steps,
            eval_batch_size=self.eval_batch_size,
            max_steps_per_epoch=self.max_steps_per_epoch,
            shuffle_buffer=self.shuffle_buffer,
            num_classes=self.num_classes,
            img_size=self.img_size,
            topk=self.topk,
            repeats=self.repeats,
        )
        _not_negative(
            workers=self.workers,
            eval_every=self.eval_every,
            checkpoint_every=self.checkpoint_every,
            log_every=self.log_every,
            warmup_epochs=self.warmup_epochs,
            weight_decay=self.weight_decay,
            clip_grad=self.clip_grad,
            min_lr=self.min_lr,
            warmup_lr=self.warmup_lr,
        )
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"--alpha must be in [0, 1], got {self.alpha}")
        if not self.tau > 0:
            raise ConfigError(f"--tau must be > 0, got {self.tau}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"--drop-path must be in [0, 1), got {self.drop_path}")
        if not 0.0 <= self.model_ema_decay <= 1.0:
            raise ConfigError(f"--model-ema-decay must be in [0, 1], got {self.model_ema_decay}")
        if self.checkpoint_every % self.accum_steps:
            raise ConfigError(
                f"--checkpoint-every {self.checkpoint_every} must be a multiple of --accum-steps {self.accum_steps}: "
                "a checkpoint taken mid-accumulation would lose the accumulated gradients"
            )
        _allowed_changes(self)
        if self.resume and self.force_new:
            raise ConfigError("--resume and --force-new contradict each other: continue the run, or replace it")
        if self.cached and not self.cache:
            raise ConfigError("--distillation hard/soft with --teacher-mode cached needs --cache")
        if self.live and not (self.teacher_checkpoint or self.cache or self.teacher_pretrained):
            raise ConfigError(
                "--teacher-mode live needs --teacher NAME and --teacher-checkpoint or --teacher-pretrained"
            )
        if self.live and not self.cache and self.teacher_checkpoint and self.teacher_pretrained:
            raise ConfigError("--teacher-checkpoint and --teacher-pretrained: give one source of teacher weights")
        teachers = len(self.cache) or (len(self.teacher) if self.teacher_pretrained else len(self.teacher_checkpoint))
        if self.teacher_weights and len(self.teacher_weights) != teachers:
            raise ConfigError(f"--teacher-weights gives {len(self.teacher_weights)} weights for {teachers} teacher(s)")
        if not all(0 < w < float("inf") for w in self.teacher_weights):  # NaN fails this too
            raise ConfigError(
                f"--teacher-weights must be finite and > 0 (leave out a teacher's --cache to drop it), "
                f"got {self.teacher_weights}"
            )
        if self.distillation == "soft" and not self.cache and float(self.tau) not in self.temperatures:
            raise ConfigError(f"--tau {self.tau} is not one of --temperatures {self.temperatures}")


def resume_role(name: str) -> str:
    """What a new value of ``TrainConfig`` option ``name`` does on ``--resume`` (one of :data:`ROLES`).

    Raises:
        TypeError: the option declares no role (a programming error: every option must say).
    """
    role = TrainConfig.__dataclass_fields__[name].metadata.get("on_resume")
    if role not in ROLES:
        raise TypeError(f"train-student option {name!r} declares no on_resume role (one of {', '.join(ROLES)})")
    return role


def _allowed_changes(cfg: TrainConfig) -> None:
    """``--allow-change`` names options (``warmup-epochs`` or ``warmup_epochs``) whose role is TRAINING."""
    cfg.allow_change = [name.replace("-", "_") for value in cfg.allow_change for name in value.split(",") if name]
    if cfg.allow_change and not cfg.resume:
        raise ConfigError("--allow-change applies to --resume only: a new run takes any option")
    known = [f.name for f in fields(TrainConfig)]
    for name in cfg.allow_change:
        role = resume_role(name) if name in known else None
        if role == TRAINING:
            continue
        why = {
            None: "there is no such option",
            RUN: "it is what the run is: a run with another value is another run (another --out, or --force-new)",
            STREAM: "it decides which samples each step holds: keep it mid-epoch; at an epoch end it may change "
            "if the global batch stays (--batch-size x ranks x --accum-steps)",
            FREE: "it changes no weight and may change on any resume without it",
        }[role]
        changeable = ", ".join(n for n in known if resume_role(n) == TRAINING)
        raise ConfigError(f"--allow-change {name}: {why}; options it takes: {changeable}")
