"""Every option is declared once, in ``pipeline/options.py``, and the CLI is generated from it.

* each field of each command's config dataclass is a flag (or argument) of that command, and a
  command run without the flag resolves to the dataclass default;
* ``--help`` shows every default and every declared choice;
* precedence is defaults < ``--config`` YAML < flags, for every kind of type;
* a bad value is refused in one line naming the option, before any work;
* adding an option to a dataclass is the only edit needed for it to become a flag;
* no function of the library or the CLI is longer than about a screen.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from cli.flags import command_from
from cli.main import COMMANDS, app
from pipeline.config import default_of, option
from pipeline.options import CacheConfig
from pipeline.train_options import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
# What each command needs on the command line to get past its checks.
REQUIRED = {
    "pack": ["digits", "out"],
    "cache-teacher": ["--shards", "a.tar", "--out", "c.zarr"],
    "cache-status": ["c.zarr"],
    "verify-cache": ["c.zarr", "--shards", "a.tar", "--teacher-checkpoint", "t.pth"],
    "train-student": ["--shards", "a.tar", "--cache", "c.zarr"],
    "evaluate": ["--checkpoint", "m.pth", "--shards", "v.tar"],
    "report": ["--run", "runs/student"],
    "demo": [],
    "presets": [],
}
GIVEN = {"source", "out", "shards", "cache", "teacher_checkpoint", "checkpoint", "run"}


def capture(cls: type, args: list[str]) -> Any:
    """Resolve ``cls`` through a generated command exactly as the real CLI does; return the config."""
    seen: list[Any] = []
    test_app = typer.Typer()
    test_app.command("run")(command_from(cls, lambda resolve: seen.append(resolve()), "test"))
    test_app.command("other")(lambda: None)  # two commands: typer keeps the subcommand name
    result = CliRunner().invoke(test_app, ["run", *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return seen[0]


@pytest.mark.parametrize("name, cls", [(n, c) for n, c, _, _ in COMMANDS], ids=[n for n, *_ in COMMANDS])
def test_every_field_is_a_flag_with_the_same_default(name: str, cls: type) -> None:
    click_command = typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]
    declared = {opt for p in click_command.params for opt in p.opts} | {p.name for p in click_command.params}
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        assert flag in declared or (f.metadata["positional"] and f.name in declared), f"{name}: no {flag}"
        assert f.metadata["help"], f"{name}: {flag} has no help"
    cfg = capture(cls, REQUIRED[name])
    for f in dataclasses.fields(cls):
        if f.name not in GIVEN:
            assert getattr(cfg, f.name) == default_of(f), f"{name} --{f.name}: default differs from the dataclass"


def test_help_shows_defaults_and_choices() -> None:
    result = CliRunner().invoke(app, ["cache-teacher", "--help"], env={"COLUMNS": "200"})
    text = " ".join(result.output.split())
    assert "(default: 10)" in text and "(default: regnety_160)" in text and "(default: 1.0,3.0)" in text
    assert "(one of: raise, skip)" in text and "(one of: auto, bar, log, off)" in text
    result = CliRunner().invoke(app, ["train-student", "--help"], env={"COLUMNS": "200"})
    assert "(one of: none, hard, soft)" in " ".join(result.output.split())


def test_yaml_then_flags_precedence(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "views: 7\ntemperatures: [2.0, 4.0]\nrecipe: {name: deit, img_size: 32}\nteacher_kwargs: {drop_rate: 0.1}\n"
        "shards: ['a-{0..1}.tar', 'pipe:cat b.tar']\nprogress: log\nforce-new: true\n"
    )
    base = ["--out", "c.zarr", "--config", str(config)]
    cfg = capture(CacheConfig, base)
    assert (cfg.views, cfg.temperatures, cfg.progress, cfg.force_new) == (7, [2.0, 4.0], "log", True)
    assert cfg.recipe == {"name": "deit", "img_size": 32} and cfg.teacher_kwargs == {"drop_rate": 0.1}
    assert cfg.shards == ["a-{0..1}.tar", "pipe:cat b.tar"], "a YAML list stays a list; a pipe: keeps its spaces"
    cfg = capture(
        CacheConfig,
        [*base, "--views", "9", "--temperatures", "1,3", "--recipe", "eval", "--no-force-new", "--shards", "pipe:x y"],
    )
    assert (cfg.views, cfg.temperatures, cfg.recipe, cfg.force_new) == (9, [1.0, 3.0], "eval", False)
    assert cfg.shards == ["pipe:x y"]
    cfg = capture(TrainConfig, ["--shards", "a.tar", "--cache", "c", "--model-kwargs", "{img_size: 32, depth: 1}"])
    assert cfg.model_kwargs == {"img_size": 32, "depth": 1}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--views", "x"], "Invalid value for '--views'"),  # click's own type check, naming the flag
        (["--progress", "sometimes"], "--progress 'sometimes': expected one of auto, bar, log, off"),
        (["--on-error", "ignore"], "--on-error 'ignore': expected one of raise, skip"),
        (["--job-count", "0"], "--job-count must be >= 1"),
        (["--view-range", "3-4"], "--view-range '3-4': expected START:STOP"),
        (["--temperatures", "1,-1"], "--temperatures must be one or more positive numbers"),
    ],
)
def test_bad_values_are_one_line_naming_the_option(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["cache-teacher", "--shards", "a.tar", "--out", "c.zarr", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output, result.output
    if result.output.startswith("error:"):
        assert result.output.strip().splitlines() == [f"error: {message}"] or len(result.output.splitlines()) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--accum-steps", "0"], "--accum-steps must be >= 1"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--alpha", "-0.5"], "--alpha must be in [0, 1]"),
        (["--distillation", "medium"], "--distillation 'medium': expected one of none, hard, soft"),
        (["--config", "/nonexistent.yaml"], "config file '/nonexistent.yaml' does not exist"),
    ],
)
def test_train_student_bad_values(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["train-student", "--shards", "a.tar", "--cache", "c.zarr", *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_adding_an_option_is_one_edit() -> None:
    """A field added to a config dataclass is a flag, with its default and help, and nothing else changes."""

    @dataclasses.dataclass
    class Extended(CacheConfig):
        label_noise: float = option(0.0, help="a new option")

    assert capture(Extended, REQUIRED["cache-teacher"]).label_noise == 0.0
    assert capture(Extended, [*REQUIRED["cache-teacher"], "--label-noise", "0.25"]).label_noise == 0.25
    test_app = typer.Typer()
    test_app.command("run")(command_from(Extended, lambda resolve: None, "test"))
    test_app.command("other")(lambda: None)
    result = CliRunner().invoke(test_app, ["run", "--help"], env={"COLUMNS": "200"})
    assert "--label-noise" in result.output and "a new option (default: 0.0)" in " ".join(result.output.split())


def test_no_function_longer_than_a_screen() -> None:
    long = []
    for path in sorted([*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("cli/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if lines > 80:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over 80 lines:\n" + "\n".join(long)
