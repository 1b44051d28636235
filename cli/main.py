"""``stillroom``: pack shards, cache a teacher, train a student, inspect and verify caches.

Every command takes ``--config FILE``: YAML with the same keys as its flags (``view_block`` or
``view-block``); flags given on the command line override the file. Expected failures (bad
options, data, cache or checkpoint) print one ``error:`` line and exit with status 2.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import typer

from cli.flags import command_from
from pipeline.errors import StillroomError
from pipeline.interrupt import RunInterrupted, sigterm_interrupts
from pipeline.options import (
    CacheConfig,
    DemoConfig,
    EvalConfig,
    PackConfig,
    PresetsConfig,
    ReportConfig,
    StatusConfig,
    VerifyConfig,
)
from pipeline.plugins import load_plugins
from pipeline.storage import storage_error
from pipeline.train_options import TrainConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)


def _setup_logging(every_rank: bool) -> None:
    """INFO on rank 0 (or on every rank where ranks are independent jobs), WARNING on the others."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    prefix = f"[rank {rank}] " if world > 1 else ""
    level = logging.INFO if rank == 0 or every_rank else logging.WARNING
    logging.basicConfig(
        level=level, format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True
    )


def _print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=1, default=str))


def _pack(cfg: PackConfig) -> None:
    from pipeline.shards.pack import pack

    meta = pack(**dataclasses.asdict(cfg))
    for split, m in meta.items():
        typer.echo(f"{split}: {m['num_samples']} samples in {len(m['shards'])} shards -> {cfg.out}/{m['pattern']}")
    for s in next(iter(meta.values()))["skipped"]:
        typer.echo(f"not packed: {s['count']} file(s), {s['reason']}, e.g. {', '.join(s['examples'])}")


def _cache_teacher(cfg: CacheConfig) -> None:
    from pipeline.phase1.cache_teacher import run

    if cfg.log_to:  # its files go to the working folder, and are written after the job: refuse now, not then
        from pipeline.files import writable_folder
        from pipeline.phase2.sinks import cache_log_folder

        writable_folder(cache_log_folder(cfg.out), "--log-to")
    s = run(cfg)
    skipped = sum(s["skipped_samples"].values())
    typer.echo(
        f"cache-teacher: {s['units_done']} units done, {s['units_skipped']} skipped (already done), "
        f"{s.get('units_damaged', 0)} damaged units redone, "
        f"{s['images']} image decodes, {s['views']} views, {skipped} bad samples skipped, "
        f"{s['bytes_written']} bytes written, {s['wall_s']:.1f}s"
        + (
            f"; {s['units_invalidated']} older units of changed shards marked not done: run again to redo them"
            if s.get("units_invalidated")
            else ""
        )
    )
    if cfg.log_to:
        from pipeline.phase2.sinks import log_cache_summary

        typer.echo(f"cache-teacher: summary logged to {', '.join(cfg.log_to)} in {log_cache_summary(cfg, s)}")


def _cache_status(cfg: StatusConfig) -> None:
    from pipeline.inspection.status import status

    if len(cfg.cache) == 1:
        _print_json(status(cfg.cache[0]))
        return
    from pipeline.inspection.compare import compare

    _print_json({"caches": [status(url) for url in cfg.cache], "teachers": compare(cfg.cache)})


def _verify_cache(cfg: VerifyConfig) -> None:
    from pipeline.inspection.verify import verify

    report = verify(cfg)
    _print_json(report)
    if not report["ok"]:
        raise typer.Exit(1)


def _train_student(cfg: TrainConfig) -> None:
    from pipeline.phase2.train import train

    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(json.dumps({"final": result}))


def _evaluate(cfg: EvalConfig) -> None:
    from pipeline.phase2.evaluate import evaluate_checkpoint

    _print_json(evaluate_checkpoint(cfg))


def _report(cfg: ReportConfig) -> None:
    from pipeline.apps.report import report

    for path in report(cfg):
        typer.echo(f"wrote {path}")


def _demo(cfg: DemoConfig) -> None:
    from pipeline.apps.demo import run_demo

    run_demo(cfg)


def _presets(cfg: PresetsConfig) -> None:
    from pipeline.preset_files import copy_presets, preset_names, preset_path

    if cfg.copy_to:
        names = copy_presets(cfg.copy_to)
        typer.echo(f"copied {len(names)} presets to {cfg.copy_to}: {', '.join(names)}")
    elif cfg.name:
        typer.echo(preset_path(cfg.name).read_text(), nl=False)
    else:
        for name in preset_names():
            typer.echo(f"{name}\t{preset_path(name)}")


def _message(e: BaseException) -> str:
    """The error's one-line message; for one re-raised from a DataLoader worker, the original's.

    torch re-raises a worker's exception as ``Caught DataError in DataLoader worker process 0.``
    followed by the worker's traceback, whose last line is ``pipeline.errors.DataError: <message>``.
    """
    text = str(e)
    if text.startswith("Caught ") and "DataLoader worker" in text.split("\n", 1)[0]:
        last = text.rstrip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def _guarded(action: Callable[[Any], None]) -> Callable[[Callable[[], Any]], None]:
    """Log setup, the config, then ``action``; an expected failure becomes one ``error:`` line and status 2."""

    def run(config: Callable[[], Any]) -> None:
        _setup_logging(every_rank=action is _cache_teacher)  # phase-1 ranks are independent jobs
        sigterm_interrupts()
        try:
            load_plugins()
            action(config())
        except RunInterrupted as e:  # a stop signal, the position saved: what a batch system requeues (143)
            typer.secho(f"interrupted: {e}", fg="yellow", err=True)
            raise typer.Exit(e.exit_code) from None
        except StillroomError as e:
            typer.secho(f"error: {_message(e)}", fg="red", err=True)
            raise typer.Exit(2) from None
        except Exception as e:
            # A storage fault surfacing through zarr or fsspec (endpoint refusing or silent) is not a bug.
            err = storage_error(e)
            if err is None:
                raise
            typer.secho(f"error: {err}", fg="red", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as e:
            signum = int(getattr(e, "signum", signal.SIGINT))
            typer.secho(f"interrupted by signal {signum}", fg="yellow", err=True)
            raise typer.Exit(128 + signum) from None

    return run


COMMANDS: list[tuple[str, type, Callable[[Any], None], str]] = [
    ("pack", PackConfig, _pack, "Pack images into webdataset shards with stable keys and a JSON sidecar."),
    (
        "cache-teacher",
        CacheConfig,
        _cache_teacher,
        "Phase 1: run the teacher over replayed views and store top-k logits (resumable).",
    ),
    ("cache-status", StatusConfig, _cache_status, "Units done, bytes per (sample, view), tail mass; compare teachers."),
    ("verify-cache", VerifyConfig, _verify_cache, "Check a cache's keys and re-run the teacher on random views."),
    (
        "train-student",
        TrainConfig,
        _train_student,
        "Phase 2: train a DeiT student from cached teacher targets (runs under torchrun too).",
    ),
    ("evaluate", EvalConfig, _evaluate, "Top-1/top-5 of the class head, the distillation head and their average."),
    (
        "report",
        ReportConfig,
        _report,
        "PNG pictures from disk: training curves of runs (overlaid) and a cache's progress, targets and bytes.",
    ),
    ("demo", DemoConfig, _demo, "Both phases end to end on the digits shipped with scikit-learn; prints one table."),
    ("presets", PresetsConfig, _presets, "List, print or copy the preset configs installed with stillroom."),
]

for _name, _cls, _action, _doc in COMMANDS:
    app.command(_name, help=_doc)(command_from(_cls, _guarded(_action), _doc))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
