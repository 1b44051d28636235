"""What every picture of ``stillroom report`` shares: figures drawn by matplotlib's Agg renderer straight to
PNG files, so a cluster node, a container or CI draws them with no display, no server and no global state
(pyplot is never imported: a figure is freed as soon as it is saved)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

DPI = 80  # 720 x 520 pixels for the 9 x 6.5 inch figures: sharp on a screen, tens of KB on disk
# Runs are told apart by colour (matplotlib's default cycle, first colours), terms and heads by line style.
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def new_figure(width: float, height: float, rows: int = 1, cols: int = 1) -> tuple[Figure, Any]:
    """A figure with an Agg canvas and its grid of axes (an array when ``rows * cols > 1``)."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=True)
    return fig, axes


def save(fig: Figure, path: str) -> str:
    """Write ``fig`` as a PNG at ``path`` (its folder made if needed) and return the path.

    The picture is reduced to a 256-colour palette: line art loses nothing visible and the file shrinks
    about threefold, small enough to commit next to a README or attach to a report.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas = fig.canvas
    canvas.draw()
    rgb = Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB")  # type: ignore[attr-defined]
    rgb.quantize(colors=256, dither=Image.Dither.NONE).save(path, format="PNG", optimize=True)
    return path


def placeholder(ax: Any, text: str) -> None:
    """An empty panel that says why it is empty (no evaluation yet, no finished unit yet)."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])
