"""``stillroom report``: PNG pictures of real tiny runs (overlaid) and of a cache that phase 1 has half
filled, drawn from disk alone; bad input is one error line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import student_config, tiny_cache_config
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from pipeline.apps.pictures import COLORS
from pipeline.apps.report_runs import load_run
from pipeline.phase1.cache_teacher import run as cache_teacher
from pipeline.phase2.metrics import read_lines
from pipeline.phase2.train import train

pytestmark = pytest.mark.usefixtures("one_thread")
GREY = (230, 230, 230)  # a unit not done yet in cache-units.png


@pytest.fixture(scope="module")
def half_cache(digits_shards: str, tiny_teacher: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Views 0-1 in blocks of 1, of which this job computed view 0 only: 3 of 6 units done."""
    out = tmp_path_factory.mktemp("cache") / "half.zarr"
    cache_teacher(
        tiny_cache_config(digits_shards, tiny_teacher, out, views=2, view_block=1, view_range="0:1", batch_size=64)
    )
    return str(out)


@pytest.fixture(scope="module")
def runs(half_cache: str, digits_shards: str, digits_val_shards: str, tmp_path_factory: pytest.TempPathFactory):
    """A baseline and a distilled student, one epoch of 4 steps each, then evaluated."""
    folder = tmp_path_factory.mktemp("runs")
    common = {"val_shards": [digits_val_shards], "epochs": 1, "max_steps_per_epoch": 4}
    train(student_config(digits_shards, None, folder / "none", distillation="none", img_size=32, **common))
    train(student_config(digits_shards, half_cache, folder / "cached", **common))
    return [str(folder / "none"), str(folder / "cached")]


def check_png(path: Path, min_kb: float = 3) -> Image.Image:
    """A real picture: a PNG that PIL reads, of some size, drawn in many colours (text, lines, fills)."""
    assert path.stat().st_size > min_kb * 1024, f"{path.name}: only {path.stat().st_size} bytes"
    image = Image.open(path)
    assert image.format == "PNG" and image.width >= 600 and image.height >= 150, (image.format, image.size)
    colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 20, f"{path.name}: {len(colours or [])} colours"
    return image.convert("RGB")


def pixels_near(pixels: np.ndarray, rgb: list[int] | tuple[int, ...], tolerance: int = 8) -> int:
    """Pixels of about this colour (the saved palette of 256 colours may round it a little)."""
    return int((np.abs(pixels - np.asarray(rgb)).max(axis=1) <= tolerance).sum())


def test_report_draws_runs_overlaid_and_a_half_filled_cache(runs: list[str], half_cache: str, tmp_path: Path) -> None:
    out = tmp_path / "pictures"
    args = ["report", "--run", runs[0], "--run", runs[1], "--label", "no KD", "--label", "cached KD"]
    result = CliRunner().invoke(app, [*args, "--cache", half_cache, "--out", str(out)])
    assert result.exit_code == 0, result.output
    names = ["runs.png", "cache-units.png", "cache-targets.png", "cache-bytes.png"]
    assert result.output.splitlines() == [f"wrote {out / n}" for n in names]
    for name in names:
        check_png(out / name)
    # the heat map: 3 of the 6 units are done, so about as many pixels are "done" green as "missing" grey
    pixels = np.asarray(check_png(out / "cache-units.png")).reshape(-1, 3).astype(int)
    green = [int(COLORS[2][i : i + 2], 16) for i in (1, 3, 5)]
    done, missing = pixels_near(pixels, green), pixels_near(pixels, GREY)
    assert done > 10_000 and 0.8 < done / missing < 1.25, (done, missing)


def test_run_curves_are_read_against_epochs(runs: list[str]) -> None:
    """Train lines sit at fractional epochs, epoch lines at each epoch's end, every head's top-1 kept."""
    curves = load_run(runs[1], "cached")
    x, loss = curves.train["loss"]
    lines = [line for line in read_lines(f"{runs[1]}/metrics.jsonl") if line["event"] == "train"]
    assert list(x) == pytest.approx([0.25, 0.5, 0.75, 1.0]) and list(loss) == [line["loss"] for line in lines]
    assert {"top1_avg", "top1_cls", "top1_dist", "img_per_s"} <= set(curves.epoch)
    assert list(curves.epoch["top1_avg"][0]) == [1.0]
    assert not any(load_run(runs[0], "none").train["distill_loss"][1]), "no teacher, no distillation term"


def test_a_cache_alone_and_a_run_alone(runs: list[str], half_cache: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", "--cache", half_cache, "--out", str(tmp_path / "c"), "--units", "1"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "cache-bytes.png",
        "cache-targets.png",
        "cache-units.png",
    ]
    result = CliRunner().invoke(app, ["report", "--run", runs[0], "--out", str(tmp_path / "r")])
    assert result.exit_code == 0 and [p.name for p in (tmp_path / "r").iterdir()] == ["runs.png"], result.output


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "error: --run or --cache is required: a training run's folder or a cache to draw"),
        (["--run", "a", "--label", "x", "--label", "y"], "error: --label gives 2 names for 1 --run folder(s)"),
        (["--run", "/nonexistent"], "error: --run '/nonexistent': no metrics.jsonl there (not a train-student --out"),
    ],
)
def test_bad_input_is_one_error_line(args: list[str], message: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", *args, "--out", str(tmp_path)])
    assert result.exit_code == 2 and result.output.startswith(message) and len(result.output.splitlines()) == 1, (
        result.output
    )
