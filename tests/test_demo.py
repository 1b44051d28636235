"""The documented commands, run through the typer CLI at reduced size, so the README cannot rot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()
TINY_STUDENT = '{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}'


def invoke(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, f"stillroom {' '.join(args)} failed:\n{result.output}\n{result.exception!r}"
    return result.output


@pytest.mark.slow
def test_documented_two_phase_commands(tmp_path: Path) -> None:
    data = tmp_path / "data"
    invoke("pack", "digits", str(data), "--per-shard", "200", "--val-fraction", "0.2")
    sidecar = json.loads((data / "train.json").read_text())
    train = str(data / sidecar["pattern"])
    val = str(data / json.loads((data / "val.json").read_text())["pattern"])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("recipe: {name: deit, img_size: 32, hflip: 0.0}\n")

    # A teacher trained by our own trainer (distillation none): how a user fine-tunes one.
    teacher_cfg = tmp_path / "teacher.yaml"
    teacher_cfg.write_text("model: regnetx_002\nrecipe: eval\nimg_size: 32\nmax_steps_per_epoch: 3\n")
    invoke(
        "train-student",
        "--config",
        str(teacher_cfg),
        "--shards",
        train,
        "--distillation",
        "none",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--workers",
        "0",
        "--out",
        str(tmp_path / "teacher"),
        "--progress",
        "off",
    )
    ckpt = tmp_path / "teacher" / "last.pth"
    assert (tmp_path / "teacher" / "resolved-config.yaml").exists()

    cache = str(tmp_path / "cache.zarr")
    out = invoke(
        "cache-teacher",
        "--config",
        str(recipe),
        "--shards",
        train,
        "--out",
        cache,
        "--teacher",
        "regnetx_002",
        "--teacher-checkpoint",
        str(ckpt),
        "--views",
        "2",
        "--view-block",
        "1",
        "--topk",
        "5",
        "--workers",
        "0",
        "--batch-size",
        "64",
        "--progress",
        "off",
    )
    assert "units done" in out
    status = json.loads(invoke("cache-status", cache))
    assert status["units_done"] == status["units_total"] and not status["missing_units"]

    student_cfg = tmp_path / "student.yaml"
    student_cfg.write_text(f"model_kwargs: {TINY_STUDENT}\nmax_steps_per_epoch: 4\n")
    out = invoke(
        "train-student",
        "--config",
        str(student_cfg),
        "--shards",
        train,
        "--val-shards",
        val,
        "--cache",
        cache,
        "--model",
        "deit_tiny_distilled_patch16_224",
        "--distillation",
        "hard",
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--workers",
        "0",
        "--out",
        str(tmp_path / "student"),
        "--progress",
        "off",
    )
    final = json.loads(out.strip().splitlines()[-1])["final"]
    assert {"top1_cls", "top1_dist", "top1_avg"} <= set(final)
    lines = [json.loads(x) for x in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines if x["event"] == "epoch"] == [0, 1]

    report = json.loads(
        invoke("evaluate", "--checkpoint", str(tmp_path / "student" / "last.pth"), "--shards", val, "--workers", "0")
    )
    assert report["samples"] == json.loads((data / "val.json").read_text())["num_samples"]
    assert report["top1_avg"] == pytest.approx(final["top1_avg"])


@pytest.mark.slow
def test_demo_tiny_runs_and_reports_measured_numbers(tmp_path: Path) -> None:
    out = invoke("demo", "--size", "tiny", "--out", str(tmp_path / "demo"))
    results = json.loads((tmp_path / "demo" / "demo-results.json").read_text())
    assert 0.0 <= results["teacher_top1"] <= 100.0 and f"{results['teacher_top1']:.2f}" in out
    assert results["seeds"] == [0, 1]  # both students once per run seed, and their mean
    for key in ("student_none_top1", "student_cached_top1"):
        per_seed = results[key]
        assert len(per_seed) == 2 and all(0.0 <= v <= 100.0 for v in per_seed)
        assert " / ".join(f"{v:.2f}" for v in per_seed) in out  # the table prints what was measured
        assert f"{sum(per_seed) / 2:.2f}" in out
    gaps = [c - n for c, n in zip(results["student_cached_top1"], results["student_none_top1"], strict=True)]
    assert f"{sum(gaps) / 2:+.2f} points on average" in " ".join(out.split())
    assert all(
        (tmp_path / "demo" / f"student-{k}-s{s}" / "last.pth").exists() for k in ("none", "cached") for s in (0, 1)
    )
    assert results["cache_summary"]["units_done"] == 2 * 5  # 2 view blocks x 5 shards
    assert results["cache_bytes_per_sample_view"] > 0
    pictures = tmp_path / "demo" / "pictures"
    names = ["runs.png", "cache-units.png", "cache-targets.png", "cache-bytes.png"]
    assert results["pictures"] == [str(pictures / n) for n in names]
    assert all((pictures / n).stat().st_size > 3000 for n in names)
    assert f"pictures (4) in {pictures}: {', '.join(names)}" in " ".join(out.split())
