"""The cache as a PyTorch data source for a training loop of one's own: the public API of ``docs/api.md``.

:class:`DistillationSource` is train-student's data path, not a copy of it: the same
:func:`~pipeline.phase2.inputs.resolve_data` and :func:`~pipeline.phase2.inputs.check_caches` open and check the
shards and caches, the same :class:`~pipeline.phase2.epoch.RankEpoch` deals the epoch to this rank, replays its
lanes in loader workers and checks every cache row (key, label, image digest, pixel digest), and the same
:func:`~pipeline.phase2.identity.check_resumable` decides which saved position continues which run. A loop that
feeds its batches to :class:`~pipeline.models.losses.DistillationLoss` therefore trains the bits train-student
trains with the same options.

It is an ``IterableDataset`` that carries its own loader: the lanes already run in ``workers`` loader
processes of their own (one per lane), and a batch is drawn from a window of copies from every lane, which
no outer worker could assemble. Iterate it directly, or wrap it in ``DataLoader(source, batch_size=None)``
(``num_workers=0``: an outer worker would replay the whole epoch again, and is refused).

Each batch is a dict: ``pixels`` (compact views, uint8 or float16 in 0-1: :class:`~pipeline.models.build.Normalized`
turns them into a model's input), ``keys``, ``label``/``mix_label``/``lam`` (each view's mixing), ``labels``
(``[n, C]``: the labels mixed and smoothed as the recipe says), ``teacher_ids`` (``[n, M]``: each teacher's
top-1), ``hard`` (``[n]``, hard distillation: the target of the distillation head) or ``soft`` (``[n, C]``,
soft distillation: the teachers' distribution at ``tau``), the raw cached targets ``t_values``/``t_indices``/
``t_lse`` that :class:`~pipeline.models.losses.DistillationLoss` reads, and ``noise_seed`` (the seed
train-student gives torch's RNG before this step's forward pass).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as torch_dist
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.config import checked
from pipeline.errors import ConfigError
from pipeline.models.losses import DistillationLoss
from pipeline.phase2.distributed import Dist
from pipeline.phase2.epoch import RankEpoch, next_batch, noise_seed
from pipeline.phase2.identity import check_resumable, run_identity
from pipeline.phase2.inputs import check_caches, resolve_data
from pipeline.train_options import TrainConfig

# How the refusals of a load name the state (train-student's name the checkpoint file).
_LOADED = "the state given to DistillationSource.load_state_dict"


def _rank_and_world(rank: int | None, world: int | None) -> Dist:
    """This process's place: as given, else torch.distributed's; refused when torchrun started several
    processes that have not joined a group yet (each would train the whole epoch, silently)."""
    if rank is None and world is None:
        if torch_dist.is_available() and torch_dist.is_initialized():
            return Dist(rank=torch_dist.get_rank(), world=torch_dist.get_world_size())
        started = int(os.environ.get("WORLD_SIZE", "1"))
        if started > 1:
            raise ConfigError(
                f"WORLD_SIZE={started} but torch.distributed is not initialised: call "
                "torch.distributed.init_process_group() before making the DistillationSource, or pass rank= and world="
            )
        return Dist()
    if rank is None or world is None or not 0 <= rank < world:
        raise ConfigError(f"rank={rank} world={world}: give both, with 0 <= rank < world (or neither)")
    return Dist(rank=rank, world=world)


def _config(shards: str | Sequence[str], cache: str | Sequence[str], **options: Any) -> TrainConfig:
    """train-student's options for a source, checked as train-student checks them."""
    listed = {k: [v] if isinstance(v, str) else list(v) for k, v in {"shards": shards, "cache": cache}.items()}
    return checked(TrainConfig(**listed, **options))


def _with_targets(batch: dict[str, Any], targets: DistillationLoss) -> dict[str, Any]:
    """The batch with its dense targets, computed by the loss's own code: the mixed smoothed labels, each
    teacher's top-1, and the distillation head's target under the key of its distillation (``hard``/``soft``)."""
    out = {**batch, "labels": targets.labels(batch)}
    if "t_indices" in batch:
        out["teacher_ids"] = batch["t_indices"][:, :, 0]
        out[targets.distillation] = targets.distill_target(batch)
    return out


def _collective_device() -> torch.device:
    """Where a collective runs: the current CUDA device under NCCL, else the CPU."""
    nccl = torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_backend() == "nccl"
    return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")


class DistillationSource(IterableDataset):
    """One rank's epochs of replayed views with their cached teacher targets, in train-student's batches.

    Iterating it yields the current epoch from its current step (the batches' fields: the module docstring);
    once the epoch's last batch is out, the source stands at the next epoch. :meth:`state_dict` /
    :meth:`load_state_dict` save and restore that position.

    Args:
        shards: Shard URLs or brace patterns (train-student's ``--shards``).
        cache: One cache, or several made over the same views (``--cache``).
        batch_size: Views per batch on this rank.
        distillation: ``hard``, ``soft`` or ``none``: which teacher targets the batches carry (and the loss of
            :meth:`loss` computes).
        tau: The temperature of soft targets (a cached one).
        teacher_weights: Each cache's weight in the teachers' combination (default: equal).
        epoch: The epoch to start at.
        epochs: The run's epochs, when known: every view they need is checked now, as train-student does
            (otherwise each epoch's views are checked when it starts).
        rank, world: This process's place; by default torch.distributed's (one process when not initialised).
        workers: Loader worker processes (one per lane; 0 or 1: in this process).
        pin_memory: Pin each batch's tensors (with CUDA), for ``.to(device, non_blocking=True)``.
        shuffle_buffer, on_error, seed, run_seed, recipe, img_size, repeats, label_key: train-student's options
            of those names (``--shuffle-buffer`` ...); defaults are train-student's, the caches' where they say.
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        cache: str | Sequence[str],
        *,
        batch_size: int = 64,
        distillation: str = "hard",
        tau: float = 1.0,
        teacher_weights: Sequence[float] = (),
        epoch: int = 0,
        epochs: int | None = None,
        rank: int | None = None,
        world: int | None = None,
        workers: int = 2,
        pin_memory: bool = False,
        shuffle_buffer: int = 2048,
        on_error: str = "raise",
        seed: int | None = None,
        run_seed: int | None = None,
        recipe: str | dict[str, Any] | None = None,
        img_size: int | None = None,
        repeats: int | None = None,
        label_key: str | None = None,
    ):
        self.cfg = _config(
            shards,
            cache,
            batch_size=batch_size,
            distillation=distillation,
            tau=tau,
            teacher_weights=list(teacher_weights),
            workers=workers,
            shuffle_buffer=shuffle_buffer,
            on_error=on_error,
            seed=seed,
            run_seed=run_seed,
            recipe=recipe,
            img_size=img_size,
            repeats=repeats,
            label_key=label_key,
        )
        if epoch < 0 or (epochs is not None and epochs <= epoch):
            raise ConfigError(f"epoch={epoch} epochs={epochs}: need 0 <= epoch < epochs")
        self.dist = _rank_and_world(rank, world)
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.data = resolve_data(self.cfg)
        self.run_seed = self.data.seed if self.cfg.run_seed is None else self.cfg.run_seed
        self.rank, self.world = self.dist.rank, self.dist.world
        # What the student must fit: the classes (their names when pack recorded them) and the views' size.
        self.num_classes, self.classes = self.data.num_classes, self.data.classes
        self.img_size = self.data.recipe.img_size
        self.identity = run_identity(self.cfg, self.data)
        self._targets = self.loss()
        soft = float(tau) if distillation == "soft" else None
        last = epochs if epochs is not None else epoch + 1
        self._cache_shards = check_caches(self.data, epoch, last, soft)
        self._checked = set(range(epoch, last))
        self._epoch, self._step = epoch, 0
        self._part: RankEpoch | None = None  # the epoch iterated last: its account of copies

    # -- where it stands ------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The epoch the next iteration yields."""
        return self._epoch

    @property
    def step(self) -> int:
        """The step of :attr:`epoch` the next iteration starts at."""
        return self._step

    def __len__(self) -> int:
        """Steps of the current epoch, the same on every rank (from shard counts alone)."""
        return self._rank_epoch(self._epoch).steps

    def set_epoch(self, epoch: int) -> None:
        """Stand at ``epoch``'s first step, unless the source already stands in it (a loaded mid-epoch position
        is kept, so a loop that calls ``set_epoch`` at every epoch's start resumes where it stopped)."""
        if epoch != self._epoch:
            self._epoch, self._step = epoch, 0

    def loss(self, alpha: float = 0.5) -> DistillationLoss:
        """DeiT's loss for these batches: their distillation, tau and teacher weights, the caches' reductions
        and the recipe's label smoothing; ``alpha`` weighs the distillation term."""
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
        d = self.data
        return DistillationLoss(
            num_classes=d.num_classes,
            distillation=self.cfg.distillation,  # type: ignore[arg-type]
            alpha=alpha,
            tau=self.cfg.tau,
            weights=d.weights,
            reductions=d.reductions,
            smoothing=d.recipe.smoothing,
        )

    # -- the batches -----------------------------------------------------------------------------
    def _rank_epoch(self, epoch: int) -> RankEpoch:
        if epoch not in self._checked:  # a view this epoch needs is checked before its first batch
            self._cache_shards = check_caches(self.data, epoch, epoch + 1)
            self._checked.add(epoch)
        return RankEpoch(self.data, self.cfg, self.dist, epoch, self.run_seed, self._cache_shards)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if get_worker_info() is not None:
            raise ConfigError(
                "DistillationSource runs its own loader workers (workers=): wrap it in "
                "DataLoader(source, batch_size=None, num_workers=0), or iterate it directly"
            )
        epoch, first = self._epoch, self._step
        part = self._part = self._rank_epoch(epoch)
        batches = iter(part.stream(first, self._targets.target_tau, pin_memory=False))
        for step in range(first, part.steps):
            batch = _with_targets(next_batch(batches, None)[0], self._targets)
            batch["noise_seed"] = noise_seed(self.run_seed, self.dist.rank, epoch, step)
            if self.pin_memory:
                batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
            self._epoch, self._step = (epoch + 1, 0) if step + 1 == part.steps else (epoch, step + 1)
            yield batch

    def account(self, device: torch.device | str | None = None) -> dict[str, Any]:
        """The copies of the epoch iterated last (from where that iteration started), over every rank (a
        collective: call it on every rank): planned, padded (DeiT's repeats that even out the ranks), filled
        slots, and skipped copies by reason.

        Args:
            device: Where the all-reduce runs (by default the current CUDA device with NCCL, else the CPU).
        """
        if self._part is None:
            raise ConfigError("DistillationSource.account(): no epoch was iterated yet")
        return self._part.account(torch.device(device) if device is not None else _collective_device())

    # -- resume ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The position (epoch, step) after the batches yielded so far, and what makes these batches these.

        The same on every rank (ranks take equal steps of a deal made from shard counts), so rank 0's copy
        resumes them all; plain values (``torch.load(..., weights_only=True)`` and JSON take it); its size does
        not grow with the data.
        """
        return {
            "epoch": self._epoch,
            "step_in_epoch": self._step,
            "world": self.dist.world,
            "identity": self.identity,
            "config": dataclasses.asdict(self.cfg),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Stand where ``state`` (from :meth:`state_dict`) stood: the next iteration yields its next batch,
        replaying only that step's window. An empty dict is a fresh start.

        Raises:
            ConfigError: ``state`` is another run's (shards, caches, recipe, seeds...), or was taken mid-epoch
                with another batch size, worker count, shuffle buffer or world size (naming the field).
        """
        if not state:
            return
        check_resumable(self.cfg, state, self.dist.world, _LOADED, self.identity)
        epoch, step = int(state["epoch"]), int(state["step_in_epoch"])
        self._rank_epoch(epoch)  # its views checked now, not at its first batch
        self._epoch, self._step = epoch, step
