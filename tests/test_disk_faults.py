"""A full disk or a read-only folder is one ``error:`` line naming the path, status 2, no traceback and no
half-written file left behind (issue: nothing lost, round three, item 9).

A full disk is emulated by making every write to files under a folder fail with ENOSPC; a read-only folder by
``chmod`` where that binds (not root), else by making every write, creation, rename or removal under it fail
with EACCES, as the kernel does for a user without write permission.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from conftest import TINY_STUDENT, cache_cli_args, tiny_cache_config
from typer.testing import CliRunner

from cli.main import app
from pipeline.phase1.cache_teacher import run as cache_teacher

pytestmark = pytest.mark.usefixtures("one_thread")


def _under(path: object, folder: Path) -> bool:
    if isinstance(path, int):
        return False
    return os.path.abspath(os.fsdecode(path)).startswith(str(folder) + os.sep)


class _FullFile:
    """A file open for writing on a full disk: every write fails with ENOSPC."""

    def __init__(self, f):
        self._f = f

    def write(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def full_disk(monkeypatch: pytest.MonkeyPatch, folder: Path, prefix: str = "") -> None:
    """Writes to files under ``folder`` (whose names start with ``prefix``) fail with ENOSPC."""
    real = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        f = real(file, mode, *args, **kwargs)
        full = _under(file, folder) and os.path.basename(os.fsdecode(file)).startswith(prefix)
        return _FullFile(f) if full and any(m in mode for m in "wax+") else f

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)


def read_only(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """``folder`` and everything under it cannot be written, created, renamed or removed."""
    if os.geteuid() != 0:  # permissions bind: make it real
        for root, dirs, files in os.walk(folder):
            for name in [*dirs, *files]:
                p = os.path.join(root, name)
                os.chmod(p, os.stat(p).st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        os.chmod(folder, os.stat(folder).st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        return

    def hit(path: object) -> bool:
        return _under(path, folder) or (not isinstance(path, int) and Path(os.fsdecode(path)).resolve() == folder)

    def denied(path: object) -> OSError:
        return PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))

    real_open, real_os_open = builtins.open, os.open

    def open_(file, mode="r", *args, **kwargs):
        if hit(file) and any(m in mode for m in "wax+"):
            raise denied(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if hit(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise denied(path)
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(os, "open", os_open)
    for name in ("mkdir", "rmdir", "remove", "unlink"):

        def guarded(path, *args, _real=getattr(os, name), **kwargs):
            if hit(path):
                raise denied(path)
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(os, name, guarded)
    for name in ("replace", "rename"):

        def moved(src, dst, *args, _real=getattr(os, name), **kwargs):
            if hit(src) or hit(dst):
                raise denied(dst)
            return _real(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, name, moved)


def restore_writable(folder: Path) -> None:
    if os.geteuid() != 0:
        for root, dirs, _ in os.walk(folder):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o755)
        os.chmod(folder, 0o755)


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def one_error_line(code: int, out: str, *names: str) -> str:
    """Status 2 and one ``error:`` line naming every one of ``names``; no traceback."""
    assert code == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, out[-3000:]
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.name.endswith((".tmp", ".partial")) or ".tmp-" in p.name]


@pytest.fixture(scope="module")
def cache(digits_shards: str, tiny_teacher: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "cache.zarr"
    cache_teacher(tiny_cache_config(digits_shards, tiny_teacher, out, views=1, view_block=1))
    return out


def _cache_args(shards: str, teacher: str, out: Path, *more: str) -> list[str]:
    return [*cache_cli_args(shards, teacher, out, views=1, view_block=1), *more]


# ---------------------------------------------------------------------------------------------------------
# A full disk


def test_a_full_disk_while_creating_the_cache(digits_shards, tiny_teacher, tmp_path, monkeypatch):
    full_disk(monkeypatch, tmp_path)
    out = tmp_path / "new.zarr"
    line = one_error_line(*cli(*_cache_args(digits_shards, tiny_teacher, out)), str(out))
    assert "no space left" in line.lower(), line
    assert leftovers(tmp_path) == []


def _train_args(shards: str, cache: Path, out: Path) -> list[str]:
    return [
        "train-student",
        *("--shards", shards, "--cache", str(cache), "--out", str(out), "--progress", "off", "--workers", "0"),
        *("--model", "deit_tiny_distilled_patch16_224", "--model-kwargs", json.dumps(TINY_STUDENT)),
        *("--epochs", "1", "--batch-size", "8", "--max-steps-per-epoch", "1", "--eval-every", "0"),
    ]


@pytest.mark.parametrize("name", ["resolved-config.yaml", "metrics.jsonl"])
def test_a_full_disk_while_writing_a_runs_record(digits_shards, cache, tmp_path, monkeypatch, name):
    out = tmp_path / "run"
    full_disk(monkeypatch, out, prefix=name)
    line = one_error_line(*cli(*_train_args(digits_shards, cache, out)), str(out / name))
    assert "no space left" in line.lower(), line
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------
# Read-only caches


@pytest.mark.parametrize("damage", ["a unit's chunk lost", "root metadata lost"])
def test_a_read_only_cache_that_needs_a_write(digits_shards, tiny_teacher, cache, tmp_path, monkeypatch, damage):
    """A damaged unit's marker must be removed, or the root metadata restored: neither can be, and says so."""
    copy = tmp_path / "cache.zarr"
    shutil.copytree(cache, copy)
    if damage == "root metadata lost":
        (copy / "zarr.json").unlink()
    else:
        next(p for p in sorted((copy / "values" / "c").rglob("*")) if p.is_file()).unlink()
    read_only(monkeypatch, copy)
    try:
        line = one_error_line(*cli(*_cache_args(digits_shards, tiny_teacher, copy)), str(copy))
    finally:
        monkeypatch.undo()
        restore_writable(copy)
    assert "permission denied" in line.lower() or "read-only" in line.lower(), line


def test_a_new_cache_in_a_read_only_folder(digits_shards, tiny_teacher, tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    read_only(monkeypatch, folder)
    try:
        out = folder / "new.zarr"
        line = one_error_line(*cli(*_cache_args(digits_shards, tiny_teacher, out)), str(out))
    finally:
        monkeypatch.undo()
        restore_writable(folder)
    assert not (folder / "new.zarr").exists(), line


# ---------------------------------------------------------------------------------------------------------
# --out that cannot be written


def _command(kind: str, where: Path, digits_shards: str, tiny_teacher: str, run: Path) -> list[str]:
    return {
        "cache-teacher": _cache_args(digits_shards, tiny_teacher, where),
        "pack": ["pack", "digits", str(where)],
        "presets": ["presets", "--copy-to", str(where)],
        "report": ["report", "--run", str(run), "--out", str(where)],
    }[kind]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder whose metrics.jsonl ``report`` can draw."""
    run = tmp_path_factory.mktemp("run")
    lines = [{"event": "start", "first_epoch": 0, "start_step": 0}]
    lines += [{"event": "train", "epoch": 0, "step": s, "loss": 2.0 / s, "lr": 0.1} for s in (1, 2)]
    lines += [{"event": "epoch", "epoch": 0, "steps": 2, "train_loss": 1.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run


@pytest.mark.parametrize("kind", ["cache-teacher", "pack", "presets", "report"])
def test_out_naming_an_existing_file(kind, digits_shards, tiny_teacher, finished_run, tmp_path):
    target = tmp_path / "taken"
    target.write_text("a user's file\n")
    line = one_error_line(*cli(*_command(kind, target, digits_shards, tiny_teacher, finished_run)), str(target))
    assert "file" in line, line
    assert target.read_text() == "a user's file\n"


@pytest.mark.parametrize("kind", ["cache-teacher", "pack", "presets", "report"])
def test_out_naming_a_read_only_folder(kind, digits_shards, tiny_teacher, finished_run, tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    read_only(monkeypatch, folder)
    try:
        code, out = cli(*_command(kind, folder, digits_shards, tiny_teacher, finished_run))
    finally:
        monkeypatch.undo()
        restore_writable(folder)
    line = one_error_line(code, out, str(folder))
    assert "permission denied" in line.lower(), line
    assert list(folder.iterdir()) == []


def test_log_to_with_a_read_only_working_folder(digits_shards, tiny_teacher, tmp_path, monkeypatch):
    """cache-teacher --log-to writes runs/ in the working folder: refused before any work, naming it."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    read_only(monkeypatch, here)
    out = tmp_path / "c.zarr"
    try:
        code, text = cli(*_cache_args(digits_shards, tiny_teacher, out, "--log-to", "tensorboard"))
    finally:
        monkeypatch.undo()
        restore_writable(here)
    one_error_line(code, text, "runs/cache-teacher-c", "--log-to")
    assert not out.exists(), "refused before any work"
