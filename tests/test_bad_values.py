"""Bad values are one ``error:`` line naming the value, the variable or the file, status 2, never a traceback
nor a silent wrong answer (issue 26, items 6 and 10).

Options that pass a range check only because they are NaN or infinite, a learning rate that makes the run
diverge, teacher weights that are not finite, batch-system variables and shard indexes whose numbers are
not numbers, a timm tag that does not exist, a metrics record whose lines are not objects, plugins that
fail, and a logger that is installed but cannot start (it is left out with a warning, as documented).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import student_config
from typer.testing import CliRunner

from cli.main import app
from pipeline.errors import ConfigError, DataError, TrainingError
from pipeline.partition import job_slot
from pipeline.phase2.sinks import open_sinks
from pipeline.phase2.train import train
from pipeline.shards.lists import load_shard_list, num_classes_from_sidecar

pytestmark = pytest.mark.usefixtures("one_thread")


def one_error_line(args: list[str], *words: str) -> str:
    result = CliRunner().invoke(app, args)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert "Traceback" not in result.output and all(w in errors[0] for w in words), result.output
    return errors[0]


@pytest.mark.parametrize(
    "args, words",
    [
        (["--lr", "inf"], ["--lr inf", "finite"]),
        (["--lr", "nan"], ["--lr nan", "finite"]),
        (["--weight-decay", "nan"], ["--weight-decay nan", "finite"]),
        (["--min-lr", "-1"], ["--min-lr must be >= 0", "-1"]),
        (["--warmup-lr", "-1e-6"], ["--warmup-lr must be >= 0"]),
        (["--model-ema-decay", "1.5"], ["--model-ema-decay must be in [0, 1]"]),
        (["--cache", "d.zarr", "--teacher-weights", "inf,1"], ["--teacher-weights", "finite", "inf"]),
        (["--cache", "d.zarr", "--teacher-weights", "nan,1"], ["--teacher-weights", "nan"]),
        (["--cache", "d.zarr", "--teacher-weights", "1,0"], ["--teacher-weights", "> 0"]),
    ],
)
def test_train_student_refuses_values_that_pass_a_range_only_by_being_nan_or_infinite(
    args: list[str], words: list[str]
) -> None:
    one_error_line(["train-student", "--shards", "a.tar", "--cache", "c.zarr", *args], *words)


def test_a_learning_rate_that_diverges_is_one_line_naming_it(digits_shards: str, tmp_path: Path) -> None:
    cfg = student_config(
        digits_shards, None, tmp_path / "run", distillation="none", img_size=32, lr=1e30, warmup_epochs=0, epochs=1
    )
    with pytest.raises(TrainingError, match=r"the loss is (nan|inf) at step \d+ of epoch 0 .*--lr 1e\+30.*diverged"):
        train(cfg)


@pytest.mark.parametrize(
    "env, name",
    [
        ({"SLURM_ARRAY_TASK_ID": "abc", "SLURM_ARRAY_TASK_COUNT": "4"}, "SLURM_ARRAY_TASK_ID"),
        ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "four"}, "SLURM_ARRAY_TASK_COUNT"),
        (
            {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "x"},
            "SLURM_ARRAY_TASK_MIN",
        ),
        ({"JOB_COMPLETION_INDEX": "1.5", "STILLROOM_JOB_COUNT": "4"}, "JOB_COMPLETION_INDEX"),
    ],
)
def test_a_batch_system_variable_that_is_not_a_number_is_named(env: dict[str, str], name: str) -> None:
    with pytest.raises(ConfigError, match=rf"\${name} is '[^']+', not a whole number"):
        job_slot(env=env)
    if not name.endswith("COUNT"):  # --job-count given: the index still comes from the variable
        with pytest.raises(ConfigError, match=rf"\${name}"):
            job_slot(job_count=4, env=env)


def test_a_shard_index_whose_count_is_not_a_number_is_named(digits_shards: str, tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    shutil.copytree(Path(digits_shards).parent, folder)
    side = json.loads((folder / "train.json").read_text())
    side["shards"][1]["count"] = "forty"
    side["shardlist"][1]["nsamples"] = "forty"
    (folder / "train.json").write_text(json.dumps(side))
    with pytest.raises(DataError, match=r"train\.json.*'train-000001\.tar' is 'forty'"):
        load_shard_list(str(folder / "train-{000000..000002}.tar"))
    old = {k: v for k, v in side.items() if k not in ("wids_version", "shardlist", "__kind__")}
    (folder / "train.json").write_text(json.dumps(old))
    with pytest.raises(DataError, match=r"train\.json.*'train-000001\.tar' is 'forty'"):
        load_shard_list(str(folder / "train.json"))
    good = json.loads((Path(digits_shards).parent / "train.json").read_text())
    (folder / "train.json").write_text(json.dumps({**good, "num_classes": "ten"}))
    with pytest.raises(DataError, match=r"train\.json.*num_classes is 'ten'"):
        num_classes_from_sidecar(str(folder / "train-000000.tar"))
    # timm's split info beside shards without a sidecar
    (folder / "train.json").unlink()
    names = [f"train-00000{i}.tar" for i in range(3)]
    info = {"splits": {"train": {"filenames": names, "shard_lengths": [40, "x", 40]}}}
    (folder / "_info.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match=r"_info\.json.*'train-000001\.tar' is 'x'"):
        load_shard_list(str(folder / "train-{000000..000002}.tar"))


def test_a_timm_tag_that_does_not_exist_is_named(digits_shards: str, tmp_path: Path) -> None:
    args = ["cache-teacher", "--shards", digits_shards, "--out", str(tmp_path / "c.zarr"), "--workers", "0"]
    line = one_error_line([*args, "--teacher", "regnetx_002.no_such_tag", "--teacher-pretrained"], "no_such_tag")
    assert "pycls_in1k" in line  # the tags timm has for it
    assert not (tmp_path / "c.zarr").exists()


def test_report_of_a_record_whose_lines_are_not_objects(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    good = {"event": "train", "epoch": 0, "step": 1, "loss": 2.0}
    for bad, words in (
        ("[1, 2]", ["metrics.jsonl line 2", "not a JSON object"]),
        ('"text"', ["line 2", "not a JSON object"]),
        ('{"event": "train", "epoch": "zero", "step": 1}', ["metrics.jsonl", "whole-number epoch"]),
        ('{"event": "train", "epoch": 0}', ["metrics.jsonl", "'step'"]),
    ):
        (run / "metrics.jsonl").write_text(json.dumps(good) + "\n" + bad + "\n")
        one_error_line(["report", "--run", str(run), "--out", str(tmp_path / "pictures")], *words)


@pytest.mark.parametrize(
    "source, words",
    [
        ("raise RuntimeError('no licence server')\n", ["RuntimeError", "no licence server", "broken_plugin.py:1"]),
        ("def f(:\n", ["SyntaxError", "broken_plugin.py:1"]),
        ("import no_such_module_anywhere\n", ["ModuleNotFoundError", "no_such_module_anywhere"]),
    ],
)
def test_a_plugin_that_fails_is_one_line_naming_it(
    source: str, words: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "broken_plugin.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("STILLROOM_PLUGINS", "broken_plugin")
    monkeypatch.delitem(sys.modules, "broken_plugin", raising=False)
    one_error_line(["presets"], "STILLROOM_PLUGINS", "'broken_plugin'", *words)
    monkeypatch.setenv("STILLROOM_PLUGINS", "no_such_plugin_here")
    one_error_line(["presets"], "cannot import plugin 'no_such_plugin_here'", "PYTHONPATH")


def test_a_logger_installed_but_broken_is_left_out_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """tensorboard's package is there, but importing it fails (a broken install, a missing dependency)."""
    pytest.importorskip("tensorboard", reason="the [tensorboard] extra is not installed")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # any import of it raises ImportError
    with caplog.at_level(logging.WARNING):
        sinks = open_sinks(["tensorboard"], str(tmp_path), "run")
    assert sinks.sinks == []
    (warning,) = [r.getMessage() for r in caplog.records if "--log-to" in r.getMessage()]
    assert "tensorboard cannot start (ModuleNotFoundError: import of torch.utils.tensorboard" in warning
    assert "left out" in warning


def test_training_goes_on_when_a_logger_cannot_start(
    digits_shards: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("tensorboard", reason="the [tensorboard] extra is not installed")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    cfg = student_config(
        digits_shards, None, tmp_path / "run", distillation="none", img_size=32, epochs=1, max_steps_per_epoch=2
    )
    result = train(dataclasses.replace(cfg, log_to=["tensorboard"]))
    assert torch.isfinite(torch.tensor(result["train_loss"]))
    assert (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "tensorboard").exists()
