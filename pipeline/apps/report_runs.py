"""``stillroom report --run OUT ...``: training curves drawn from each run's ``metrics.jsonl``, several runs
overlaid (a baseline against a distilled student): the loss and its two terms, the learning rate, the
validation top-1 of each head and the throughput, all against epochs.

Nothing but the record is read, so a run can be drawn while it trains, after it was killed, or on
another machine than the one that trained it.
"""

from __future__ import annotations

import itertools
import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from matplotlib.lines import Line2D

from pipeline.apps.pictures import COLORS, new_figure, placeholder, save
from pipeline.errors import ConfigError, DataError
from pipeline.phase2.metrics import read_lines

# Line style of each loss term and of each head; colour tells the runs apart.
LOSS_TERMS = {"loss": "-", "base_loss": "--", "distill_loss": ":"}
HEADS = {"top1_avg": "-", "top1_cls": "--", "top1_dist": ":"}
SMOOTH_ABOVE = 200  # train lines per run beyond which curves are drawn as a running mean


@dataclass
class RunCurves:
    """One run's series: ``train`` lines at fractional epochs, ``epoch`` lines at each epoch's end."""

    label: str
    train: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    epoch: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def distilled(self) -> bool:
        """Trained with a teacher: its distillation term is not 0 throughout (``--distillation none``)."""
        return "distill_loss" in self.train and bool(np.any(self.train["distill_loss"][1]))


def load_run(folder: str, label: str) -> RunCurves:
    """Read ``folder/metrics.jsonl`` into series against epochs.

    A ``train`` line of epoch ``e`` at step ``s`` sits at ``e + s / S_e``, where ``S_e`` is the epoch's
    step count (from its ``epoch`` line, else the last step logged): the runs of a comparison line up by
    epoch even when their batch sizes, and so their step counts, differ.
    """
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.exists(path):
        raise ConfigError(f"--run {folder!r}: no metrics.jsonl there (not a train-student --out folder)")
    lines = read_lines(path)
    try:
        steps = _epoch_steps(lines)
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: a train or epoch line has no whole-number epoch and step ({e!r})") from None
    train: dict[str, list[tuple[float, float]]] = defaultdict(list)
    epoch: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for line in lines:
        event = line.get("event")
        if event == "train":
            x = int(line["epoch"]) + int(line["step"]) / max(steps[int(line["epoch"])], 1)
            for key in (*LOSS_TERMS, "lr", "img_per_s"):
                if isinstance(line.get(key), int | float):
                    train[key].append((x, float(line[key])))
        elif event == "epoch":
            for key in (*HEADS, "img_per_s", "train_loss"):
                if isinstance(line.get(key), int | float):
                    epoch[key].append((int(line["epoch"]) + 1.0, float(line[key])))
    return RunCurves(label, _arrays(train), _arrays(epoch))


def _epoch_steps(lines: list[dict[str, Any]]) -> dict[int, int]:
    """Each epoch's step count (its ``epoch`` line's, else the last step logged); checks every line's numbers."""
    steps: dict[int, int] = defaultdict(int)
    for line in lines:
        if line.get("event") in ("train", "epoch"):
            step = line["step"] if line.get("event") == "train" else line.get("step", line.get("steps", 0))
            steps[int(line["epoch"])] = max(steps[int(line["epoch"])], int(step))
    return steps


def _arrays(series: dict[str, list[tuple[float, float]]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Points sorted by x; a point logged twice (steps redone after a resume) keeps its last value."""
    out = {}
    for key, points in series.items():
        last = dict(points)
        xs = np.array(sorted(last))
        out[key] = (xs, np.array([last[x] for x in xs]))
    return out


def _smoothed(y: np.ndarray) -> np.ndarray:
    """A running mean over 1/100 of the points when there are many: per-step losses are noisy."""
    if len(y) <= SMOOTH_ABOVE:
        return y
    window = max(len(y) // 100, 2)
    padded = np.concatenate([np.full(window - 1, y[0]), y])
    return np.convolve(padded, np.ones(window) / window, mode="valid")


def _colored(runs: list[RunCurves]) -> Iterator[tuple[str, RunCurves]]:
    """Each run with its colour, the same in every panel (the colours repeat past eight runs)."""
    return zip(itertools.cycle(COLORS), runs)


def _draw_loss(ax: Any, runs: list[RunCurves]) -> None:
    for color, run in _colored(runs):
        for key, style in LOSS_TERMS.items():
            if key in run.train and (key != "distill_loss" or run.distilled):
                x, y = run.train[key]
                ax.plot(x, _smoothed(y), style, color=color, linewidth=1.2)
    ax.set(title="training loss and its terms", xlabel="epoch", ylabel="loss")
    styles = [Line2D([], [], color="0.3", linestyle=s, label=k.replace("_", " ")) for k, s in LOSS_TERMS.items()]
    ax.legend(handles=styles, fontsize=8, loc="upper right")


def _draw_lr(ax: Any, runs: list[RunCurves]) -> None:
    for color, run in _colored(runs):
        if "lr" in run.train:
            ax.plot(*run.train["lr"], color=color, linewidth=1.2)
    ax.set(title="learning rate", xlabel="epoch", ylabel="lr")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))


def _draw_top1(ax: Any, runs: list[RunCurves]) -> None:
    if not any(k in run.epoch for run in runs for k in HEADS):
        placeholder(ax, "no validation yet (--val-shards, --eval-every)")
        ax.set_title("validation top-1 %")
        return
    for color, run in _colored(runs):
        for key, style in HEADS.items():
            if key in run.epoch and (key != "top1_dist" or run.distilled):  # no teacher: an untrained head
                ax.plot(*run.epoch[key], style, color=color, marker="o", markersize=3, linewidth=1.2)
    ax.set(title="validation top-1 %", xlabel="epoch", ylabel="top-1 %")
    styles = [Line2D([], [], color="0.3", linestyle=s, label=k.split("_")[1] + " head") for k, s in HEADS.items()]
    ax.legend(handles=styles, fontsize=8, loc="lower right")


def _draw_throughput(ax: Any, runs: list[RunCurves]) -> None:
    for color, run in _colored(runs):
        if "img_per_s" in run.epoch:
            ax.plot(*run.epoch["img_per_s"], color=color, marker="o", markersize=3, linewidth=1.2)
        elif "img_per_s" in run.train:
            ax.plot(*run.train["img_per_s"], color=color, linewidth=1.2)
    ax.set(title="training throughput (all ranks)", xlabel="epoch", ylabel="images / s")
    ax.set_ylim(bottom=0)


def runs_picture(folders: list[str], labels: list[str], path: str) -> str:
    """Draw the runs' curves, overlaid, into one PNG of four panels; returns its path."""
    runs = [load_run(folder, label) for folder, label in zip(folders, labels, strict=True)]
    fig, axes = new_figure(9, 6.5, 2, 2)
    _draw_loss(axes[0, 0], runs)
    _draw_lr(axes[0, 1], runs)
    _draw_top1(axes[1, 0], runs)
    _draw_throughput(axes[1, 1], runs)
    handles = [Line2D([], [], color=c, linewidth=2.5, label=r.label) for c, r in _colored(runs)]
    fig.legend(
        handles=handles, loc="outside upper center", ncols=min(len(runs), 2), frameon=False
    )  # long labels: two per row
    return save(fig, path)
