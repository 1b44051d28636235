"""``--log-to``: TensorBoard and W&B get every scalar of metrics.jsonl, from the same lines, at steps that
continue across a resume; a missing extra is one error line before any work."""

from __future__ import annotations

import gc
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from conftest import cache_cli_args, student_config, tiny_cache_config
from typer.testing import CliRunner

from cli.main import app
from pipeline.config import checked
from pipeline.phase1.cache_teacher import run as cache_teacher
from pipeline.phase2.checkpoint import move_previous_aside, prepare_out
from pipeline.phase2.sinks import Sinks, StepClock, scalars_of, wandb_mode
from pipeline.phase2.train import train
from pipeline.train_options import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")
HEADS = ("cls", "dist", "avg")


@pytest.fixture(scope="module")
def cache(digits_shards: str, tiny_teacher: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("cache") / "cache.zarr"
    cache_teacher(tiny_cache_config(digits_shards, tiny_teacher, out, views=2, view_block=1, batch_size=64))
    return str(out)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tensorboard_gets_every_scalar_of_the_record(
    cache: str, digits_shards: str, digits_val_shards: str, tmp_path: Path
) -> None:
    pytest.importorskip("tensorboard", reason="the [tensorboard] extra is not installed")
    out = tmp_path / "run"
    cfg = student_config(
        digits_shards, cache, out, val_shards=[digits_val_shards], max_steps_per_epoch=3, log_to=["tensorboard"]
    )
    train(cfg)
    got = tensorboard_scalars(out / "tensorboard")
    lines = read_metrics(out)
    steps = [(x["epoch"], x["step"]) for x in lines if x["event"] == "train"]
    assert steps == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    for name in ("loss", "base_loss", "distill_loss", "lr", "img_per_s"):
        values = [x[name] for x in lines if x["event"] == "train"]
        # train lines at their global step: epoch 1 continues after epoch 0's 3 steps
        assert sorted(got[f"train/{name}"]) == [1, 2, 3, 4, 5, 6], name
        assert [got[f"train/{name}"][s] for s in range(1, 7)] == pytest.approx(values, rel=1e-6), name
    epochs = [x for x in lines if x["event"] == "epoch"]
    for key in [f"top{k}_{h}" for k in (1, 5) for h in HEADS] + ["train_loss", "img_per_s", "epoch_s"]:
        assert got[f"epoch/{key}"] == pytest.approx({e["epoch"]: e[key] for e in epochs}, rel=1e-6), key
    assert got["epoch/views/min"] == {0: epochs[0]["views"][0], 1: epochs[1]["views"][0]}
    assert got["epoch/copies/planned"][0] == epochs[0]["copies"]["planned"]
    assert "train/step" not in got and "epoch/epoch" not in got, "the x of an event is not plotted against itself"


def test_the_step_clock_continues_across_a_resume() -> None:
    fresh = [
        {"event": "start", "first_epoch": 0, "start_step": 0},
        {"event": "train", "epoch": 0, "step": 5},
        {"event": "epoch", "epoch": 0, "steps": 10},
    ]
    clock = StepClock()
    assert [clock.see(x) for x in fresh] == [0, 5, 0]
    assert clock.see({"event": "train", "epoch": 1, "step": 4}) == 14
    # a run stopped at epoch 0 step 4, resumed: its first epoch reports 6 steps; the next starts at 10
    resumed = StepClock(past=[{"event": "start", "first_epoch": 0, "start_step": 0}])
    assert resumed.see({"event": "start", "first_epoch": 0, "start_step": 4}) == 4
    assert resumed.see({"event": "train", "epoch": 0, "step": 6}) == 6
    resumed.see({"event": "epoch", "epoch": 0, "steps": 6})
    assert resumed.see({"event": "train", "epoch": 1, "step": 1}) == 11
    # a process resumed at epoch 3 learns the epoch length from the lines already in metrics.jsonl
    assert StepClock(past=fresh).see({"event": "start", "first_epoch": 3, "start_step": 0}) == 30


def test_scalars_flatten_nested_fields_and_lists() -> None:
    line = {"time": 1.5, "loss": 2.0, "views": [3, 5], "copies": {"planned": 8, "skipped": {"unreadable": 1}}}
    assert scalars_of({**line, "distillation": "hard", "ok": True, "nan": float("nan")}) == {
        "loss": 2.0,
        "views/min": 3,
        "views/max": 5,
        "views/count": 2,
        "copies/planned": 8.0,
        "copies/skipped/unreadable": 1.0,
    }


def test_wandb_runs_offline_without_an_account(
    cache: str, digits_shards: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if importlib.util.find_spec("wandb") is None:
        pytest.skip("the [wandb] extra is not installed (pip install 'stillroom[wandb]')")
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no `wandb login` on this machine either
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert wandb_mode() == "offline"
    out = tmp_path / "run"
    train(student_config(digits_shards, cache, out, epochs=1, max_steps_per_epoch=2, log_to=["wandb"]))
    gc.collect()  # the run's MetricsLog goes away: its W&B run is finished
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    (data,) = run_dir.glob("run-*.wandb")
    records = wandb_records(data)
    assert "exit" in records, "the W&B run was finished"
    history = [{k: json.loads(v) for k, v in row.items()} for row in records["history"]]
    lines = [x for x in read_metrics(out) if x["event"] in ("train", "epoch")]
    assert len(history) == len(lines) == 3
    for row, line in zip(history, lines, strict=True):
        event = line["event"]
        for name in ("loss", "base_loss", "distill_loss", "lr", "img_per_s", "train_loss", "epoch_s"):
            if name in line:
                assert row[f"{event}/{name}"] == pytest.approx(line[name]), name
    assert [row.get("train/global_step") for row in history] == [1, 2, None]


def wandb_records(path: Path) -> dict[str, list[dict[str, str]]]:
    """The items of each kind of record of an offline W&B run file: a leveldb-style log (7-byte file
    header, 32 KiB blocks, 7-byte record headers) of the protobuf records that ``wandb sync`` uploads."""
    from wandb.proto import wandb_internal_pb2

    data, pos, chunk = path.read_bytes(), 7, b""
    out: dict[str, list[dict[str, str]]] = {}
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = chunk + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk, what = b"", record.WhichOneof("record_type")
            items = record.history.item if what == "history" else []
            out.setdefault(what, []).append({i.key or "/".join(i.nested_key): i.value_json for i in items})
    return out


def test_cache_teacher_logs_its_summary(
    digits_shards: str, tiny_teacher: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("tensorboard", reason="the [tensorboard] extra is not installed")
    monkeypatch.chdir(tmp_path)
    args = cache_cli_args(digits_shards, tiny_teacher, tmp_path / "c.zarr", views=1, view_block=1)
    result = CliRunner().invoke(app, [*args, "--log-to", "tensorboard"])
    assert result.exit_code == 0, result.output
    assert "summary logged to tensorboard in runs/cache-teacher-c" in result.output
    got = tensorboard_scalars(tmp_path / "runs" / "cache-teacher-c" / "tensorboard")
    assert got["cache_teacher/units_done"] == {0: 3.0} and got["cache_teacher/views"] == {0: 120.0}
    assert got["cache_teacher/wall_s"][0] > 0


def test_log_to_is_a_comma_list_of_known_loggers() -> None:
    cfg = TrainConfig(shards=["a.tar"], cache=["c.zarr"], log_to=["tensorboard, wandb"])
    if importlib.util.find_spec("wandb") and importlib.util.find_spec("tensorboard"):
        assert checked(cfg).log_to == ["tensorboard", "wandb"]
    result = CliRunner().invoke(app, ["train-student", "--shards", "a.tar", "--cache", "c", "--log-to", "mlflow"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: --log-to 'mlflow': expected one of tensorboard, wandb"


@pytest.mark.parametrize("command", ["train-student", "cache-teacher"])
def test_a_missing_extra_is_one_error_line_naming_the_install(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec: not installed
    out = tmp_path / "out"
    args = [command, "--shards", "a.tar", "--out", str(out), "--log-to", "wandb"]
    result = CliRunner().invoke(app, [*args, *(["--cache", "c.zarr"] if command == "train-student" else [])])
    assert result.exit_code == 2
    expected = "error: --log-to wandb needs the wandb package, not installed: pip install 'stillroom[wandb]'"
    assert result.output.strip() == expected
    assert not out.exists(), "refused before any work"


class _Broken:
    def write(self, line: dict, scalars: dict, step: int) -> None:
        raise OSError("disk full")

    def close(self) -> None:
        self.closed = True


class _Kept:
    def __init__(self) -> None:
        self.lines: list[dict] = []

    def write(self, line: dict, scalars: dict, step: int) -> None:
        self.lines.append(line)

    def close(self) -> None:
        pass


def test_a_failing_logger_is_dropped_and_the_others_go_on(caplog: pytest.LogCaptureFixture) -> None:
    broken, kept = _Broken(), _Kept()
    sinks = Sinks([broken, kept])
    for step in (1, 2):
        sinks.write({"event": "train", "epoch": 0, "step": step, "loss": 1.0})
    assert len(kept.lines) == 2 and sinks.sinks == [kept] and broken.closed
    assert sum("disk full" in r.getMessage() for r in caplog.records) == 1, "one warning, not one per line"


def test_force_new_moves_the_loggers_files_aside(tmp_path: Path) -> None:
    out = tmp_path / "run"
    (out / "tensorboard").mkdir(parents=True)
    (out / "tensorboard" / "events.out.tfevents.1").write_bytes(b"x")
    (out / "metrics.jsonl").write_text("{}\n")
    cfg = TrainConfig(shards=["a.tar"], out=str(out), force_new=True)
    prepare_out(cfg)
    assert not list(out.glob("replaced-*")), "nothing moves before the new run is checked"
    move_previous_aside(cfg)
    (aside,) = out.glob("replaced-*")
    assert (aside / "tensorboard" / "events.out.tfevents.1").exists() and not (out / "tensorboard").exists()
