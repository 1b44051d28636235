"""Shards and caches on object storage, against a real S3 API (moto's server on 127.0.0.1).

Everything the local suite shows for local paths must hold on S3 too, array for array: a cache built
from S3 shards into S3 equals the local one; two jobs fill one S3 cache; ``pipe:`` shards give the
same cache as plain paths; training and --resume read it. Start-up is measured on the wire (a
counting proxy sits in front of the server): counts come from the sidecar or index, or from tar
headers read in small ranges, never from downloading a shard. A refused or silent endpoint ends a
command with one ``error:`` line naming the URL, after stated retries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import zarr
from conftest import (
    ROOT,
    cache_cli_args,
    stillroom_cmd,
    student_config,
    tiny_cache_config,
    write_digits_shards,
)
from s3server import CountingProxy, free_port, moto_server, silent_server
from typer.testing import CliRunner

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

from cli.main import app
from pipeline.cache import ARRAYS, open_cache
from pipeline.errors import CacheError
from pipeline.inspection.status import status
from pipeline.phase1.cache_teacher import run as cache_teacher
from pipeline.phase2.train import train
from pipeline.shards.lists import load_shard_list, num_classes_from_sidecar
from pipeline.shards.tars import count_samples
from pipeline.storage.s3 import S3FileSystem
from pipeline.train_options import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

BUCKET = "stillroom-test"
CACHE = {"views": 2, "view_block": 1, "batch_size": 64}


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory):
    """moto's S3 server as a subprocess on a free port, for the whole session; stopped at the end."""
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as endpoint:
        yield endpoint


def _is_cache(url: str) -> bool:
    try:
        open_cache(url)
        return True
    except CacheError:
        return False


def _s3_env(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def _fresh_filesystems() -> None:
    """fsspec reuses filesystem instances: close and drop them when the endpoint (an env var) changes."""
    for fs in list(S3FileSystem._cache.values()):
        s3 = getattr(fs, "_s3", None)
        if s3 is not None:
            with contextlib.suppress(Exception):
                if fs.asynchronous:  # zarr's: its session lives on zarr's loop
                    from zarr.core.sync import sync as zarr_sync

                    zarr_sync(s3.__aexit__(None, None, None))
                else:
                    S3FileSystem.close_session(fs.loop, s3)
    S3FileSystem.clear_instance_cache()


@dataclasses.dataclass
class S3:
    proxy: CountingProxy
    fs: S3FileSystem
    local: Path  # the packed shards on disk, as uploaded
    pattern: str  # their brace pattern, locally
    url: str  # s3://.../digits: the shards with pack's sidecar (train.json)
    bare: str  # s3://.../bare: the same shards without it


@pytest.fixture(scope="module")
def s3(moto: str, tmp_path_factory: pytest.TempPathFactory):
    """The S3 environment of this module (through the counting proxy), a bucket, packed and uploaded digits."""
    proxy = CountingProxy(moto)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**_s3_env(proxy.endpoint), "OMP_NUM_THREADS": "1"}.items():
            mp.setenv(key, value)
        _fresh_filesystems()
        fs = S3FileSystem()
        fs.mkdir(BUCKET)
        local = tmp_path_factory.mktemp("digits-s3")
        pattern = write_digits_shards(local, 48, 16)  # pack's writer: 3 shards of 16 and train.json
        fs.put(f"{local}/", f"{BUCKET}/digits/", recursive=True)
        for tar in sorted(local.glob("*.tar")):
            fs.put(str(tar), f"{BUCKET}/bare/{tar.name}")
        yield S3(proxy, fs, local, pattern, f"s3://{BUCKET}/digits", f"s3://{BUCKET}/bare")
        _fresh_filesystems()
    proxy.close()


SHARDS = "train-{000000..000002}.tar"


@pytest.fixture(scope="module")
def local_cache(s3: S3, tiny_teacher: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the same shards and settings, all local."""
    out = tmp_path_factory.mktemp("local-cache") / "cache"
    cache_teacher(tiny_cache_config(s3.pattern, tiny_teacher, out, **CACHE))
    return out


@pytest.fixture(scope="module")
def s3_cache(s3: S3, tiny_teacher: str) -> str:
    """Shards and cache on S3; no --num-classes: the class count comes from the sidecar on S3."""
    out = f"s3://{BUCKET}/caches/phase1"
    summary = cache_teacher(tiny_cache_config(f"{s3.url}/{SHARDS}", tiny_teacher, out, **CACHE))
    assert summary["units_done"] == 6
    return out


def _arrays(url: str | Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(url), mode="r")
    return {name: np.asarray(g[name][...]) for name in ARRAYS}


def _assert_same_cache(a: str | Path, b: str | Path) -> None:
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    assert ga.attrs["stillroom"]["fingerprint"] == gb.attrs["stillroom"]["fingerprint"]
    x, y = _arrays(a), _arrays(b)
    for name in ARRAYS:
        assert np.array_equal(x[name], y[name]), name


def _tar_gets(requests: list[tuple[str, str]]) -> list[str]:
    return [path for method, path in requests if method == "GET" and ".tar" in path]


# ---------------------------------------------------------------------------------------------
# Start-up: counts without downloading shards


def test_remote_sidecar_and_index_give_counts_and_classes(s3: S3):
    """pack's train.json on S3 is read (it used to be ignored: "number of classes unknown")."""
    s3.proxy.reset()
    shards = load_shard_list(f"{s3.url}/{SHARDS}")
    assert [(s.name, s.count) for s in shards] == [(f"train-{i:06d}.tar", 16) for i in range(3)]
    assert num_classes_from_sidecar(shards[0].url) == 10
    by_index = load_shard_list(f"{s3.url}/train.json")  # the sidecar is also a wids index
    assert [(s.url, s.count) for s in by_index] == [(s.url, s.count) for s in shards]
    down, requests = s3.proxy.snapshot()
    assert _tar_gets(requests) == [], requests
    assert down < 20_000, down  # the sidecar and a few HEAD/LIST answers


def _big_shard(path: Path, samples: int = 40) -> str:
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(path)) as sink:
        for i in range(samples):
            sink.write({"__key__": f"big{i:03d}", "jpg": rng.bytes(60_000 + 37 * i), "cls": b"1"})
    return str(path)


def test_header_scan_on_s3_reads_a_few_kb_per_sample(s3: S3, tmp_path: Path):
    """No sidecar, no index: the count comes from tar headers read in small ranges, not a download."""
    local = _big_shard(tmp_path / "big-000000.tar")
    size = Path(local).stat().st_size
    s3.fs.put(local, f"{BUCKET}/big/big-000000.tar")
    url = f"s3://{BUCKET}/big/big-000000.tar"
    count_samples(url)  # warm: client set-up and credentials are not per shard
    s3.proxy.reset()
    t0 = time.perf_counter()
    assert count_samples(url) == 40
    remote_s = time.perf_counter() - t0
    down, requests = s3.proxy.snapshot()
    gets = len(_tar_gets(requests))
    t0 = time.perf_counter()
    assert count_samples(local) == 40
    local_s = time.perf_counter() - t0
    print(
        f"\nheader scan of a {size} B shard (40 samples of ~60 KB): S3 {down} B down in {gets} GETs, "
        f"{remote_s * 1000:.0f} ms; local {local_s * 1000:.1f} ms"
    )
    assert gets <= 2 * 40 + 2, gets  # about one ranged GET per sample
    assert down <= 40 * 12_000, down  # a few KB per sample (headers, read-ahead, HTTP), not 60 KB
    assert down < size / 4


def test_rerun_of_a_finished_s3_cache_reads_no_shard(s3: S3, s3_cache: str, tiny_teacher: str):
    """Everything done: the re-run (now with --num-classes) opens no tar on S3 and computes nothing."""
    s3.proxy.reset()
    summary = cache_teacher(tiny_cache_config(f"{s3.url}/{SHARDS}", tiny_teacher, s3_cache, num_classes=10, **CACHE))
    assert summary["units_done"] == 0 and summary["units_skipped"] == 6
    down, requests = s3.proxy.snapshot()
    assert _tar_gets(requests) == [], _tar_gets(requests)
    print(f"\nre-run of a finished S3 cache: {down} B down in {len(requests)} requests")


# ---------------------------------------------------------------------------------------------
# Phase 1 and phase 2 on S3, compared with local runs


def test_phase1_shards_and_cache_on_s3_equal_local(s3_cache: str, local_cache: Path):
    _assert_same_cache(local_cache, s3_cache)


def test_two_jobs_pipe_and_s3_shards_fill_one_s3_cache(s3: S3, local_cache: Path, tiny_teacher: str, tmp_path):
    """Two jobs at once into one S3 cache, one reading the shards through ``pipe:cat`` of the local
    files, the other from S3: one identity per shard, so one cache, equal to the local one."""
    out = f"s3://{BUCKET}/caches/two-jobs"
    local_urls = [str(p) for p in sorted(s3.local.glob("train-*.tar"))]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = []
    for index, shards in enumerate([[f"pipe:cat {u}" for u in local_urls], [f"{s3.bare}/{SHARDS}"]]):
        args = cache_cli_args("", tiny_teacher, Path(out), **CACHE)  # type: ignore[arg-type]
        at = args.index("--shards")
        args[at : at + 2] = [x for s in shards for x in ("--shards", s)]
        args[args.index("--out") + 1] = out
        args += ["--job-index", str(index), "--job-count", "2", "--num-classes", "10"]
        log = open(tmp_path / f"job{index}.log", "w")  # noqa: SIM115 (closed below)
        procs.append((subprocess.Popen([*stillroom_cmd(), *args], env=env, stdout=log, stderr=log), log))
    for proc, log in procs:
        proc.wait(timeout=300)
        log.close()
    for index, (proc, _) in enumerate(procs):
        text = (tmp_path / f"job{index}.log").read_text()
        assert proc.returncode == 0, text[-3000:]
        print(f"\njob {index}: {text.strip().splitlines()[-1]}")
    _assert_same_cache(local_cache, out)
    for index in range(2):
        assert "Found credentials" not in (tmp_path / f"job{index}.log").read_text()  # botocore's INFO line
    got = status(out)
    assert got["units_done"] == got["units_total"] == 6
    assert got["bytes_on_disk"] == s3.fs.du(f"{BUCKET}/caches/two-jobs", total=True) > 0


def _student(shards: str, cache: str, out: Path, **kw) -> TrainConfig:
    return student_config(shards, cache, out, max_steps_per_epoch=3, eval_every=0, **kw)


def test_phase2_and_resume_with_shards_and_cache_on_s3(s3: S3, s3_cache: str, local_cache: Path, tmp_path: Path):
    """One epoch from S3, then --resume to two: the same weights as two epochs from local files."""
    torch.manual_seed(0)
    train(_student(s3.pattern, str(local_cache), tmp_path / "local"))
    remote = _student(f"{s3.url}/{SHARDS}", s3_cache, tmp_path / "remote")
    train(dataclasses.replace(remote, epochs=1))
    train(dataclasses.replace(remote, resume=True, allow_change=["epochs"]))
    ref = torch.load(tmp_path / "local" / "last.pth", weights_only=True)
    got = torch.load(tmp_path / "remote" / "last.pth", weights_only=True)
    assert got["epoch"] == ref["epoch"] == 2
    differing = [k for k in ref["model"] if not torch.equal(ref["model"][k], got["model"][k])]
    assert not differing, differing[:5]


# ---------------------------------------------------------------------------------------------
# A job killed while creating the cache on S3


class _FailFastClock:
    """Stand-in for ``time`` in pipeline.cache: the wait for another job's attributes fails after 10 s."""

    monotonic = staticmethod(time.monotonic)
    deadline = 0.0

    @classmethod
    def sleep(cls, seconds: float) -> None:
        if time.monotonic() > cls.deadline:
            raise TimeoutError("waited 10 s for the cache to be finished by a job that is dead")
        time.sleep(seconds)


def test_sigkill_while_creating_the_cache_on_s3_then_rerun_completes(
    s3: S3, local_cache: Path, tiny_teacher: str, tmp_path: Path, monkeypatch
):
    out = f"s3://{BUCKET}/caches/killed"
    # Stalled on the group's document, which creation writes last: the arrays exist, the attributes not.
    s3.proxy.stall, s3.proxy.stall_s = re.compile(rb"^PUT \S*/caches/killed/zarr\.json"), 60.0
    s3.proxy.stalled.clear()
    args = cache_cli_args(s3.pattern, tiny_teacher, Path("x"), **CACHE)
    args[args.index("--out") + 1] = out
    proc = subprocess.Popen([*stillroom_cmd(), *args], env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert s3.proxy.stalled.wait(120), "the job never started creating the cache"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        s3.proxy.stall = None
    # Half made: some array metadata written, no group attributes, so no reader takes it for a cache.
    s3.fs.invalidate_cache()
    assert s3.fs.find(f"{BUCKET}/caches/killed") and not _is_cache(out)
    _FailFastClock.deadline = time.monotonic() + 10
    monkeypatch.setattr("pipeline.cache.time", _FailFastClock, raising=False)
    _fresh_filesystems()
    cache_teacher(tiny_cache_config(s3.pattern, tiny_teacher, out, **CACHE))  # type: ignore[arg-type]
    _assert_same_cache(local_cache, out)

    # What a job of an older version left when killed: only the group's zarr.json, without attributes.
    bare = f"s3://{BUCKET}/caches/bare-group"
    s3.fs.pipe(f"{BUCKET}/caches/bare-group/zarr.json", b'{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    _fresh_filesystems()
    cache_teacher(tiny_cache_config(s3.pattern, tiny_teacher, bare, **CACHE))  # type: ignore[arg-type]
    _assert_same_cache(local_cache, bare)


# ---------------------------------------------------------------------------------------------
# Storage faults: one line, after stated retries


def _run_with(endpoint: str, args: list[str], **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """``stillroom ARGS`` in a subprocess whose S3 endpoint is ``endpoint``."""
    full_env = {**os.environ, **_s3_env(endpoint), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    t0 = time.perf_counter()
    proc = subprocess.run([*stillroom_cmd(), *args], env=full_env, capture_output=True, text=True, timeout=300)
    return proc, time.perf_counter() - t0


def _one_error_line(returncode: int, output: str, *words: str) -> str:
    assert returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output[-3000:]
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def test_refused_connection_ends_with_one_error_line(s3: S3, tiny_teacher: str, tmp_path: Path, monkeypatch):
    """A stopped server: cache-status, cache-teacher and train-student each print one line naming the URL."""
    dead = f"http://127.0.0.1:{free_port()}"
    cache = f"s3://{BUCKET}/caches/phase1"
    teacher = cache_cli_args(s3.pattern, tiny_teacher, Path(cache), **CACHE)
    teacher[teacher.index("--out") + 1] = cache
    for key, value in {**_s3_env(dead), "STILLROOM_S3_TRIES": "2"}.items():
        monkeypatch.setenv(key, value)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        for args in (
            ["cache-status", cache],
            teacher,
            ["train-student", "--shards", f"{s3.url}/{SHARDS}", "--cache", cache, "--out", str(tmp_path / "t")],
        ):
            _fresh_filesystems()
            t0 = time.perf_counter()
            result = CliRunner().invoke(app, args)
            seconds = time.perf_counter() - t0
            line = _one_error_line(result.exit_code, result.output, dead)
            print(f"\n{args[0]} against a stopped server, {seconds:.1f}s: {line}")
            assert seconds < 30, (args[0], seconds)
    finally:
        _fresh_filesystems()
        root.handlers[:], root.level = handlers, level  # the CLI pointed logging at CliRunner's closed stream


def test_silent_server_is_retried_then_given_up(s3: S3):
    """An endpoint that accepts but never answers: a warning per failed try, then one error line."""
    with silent_server() as endpoint:
        env = {"STILLROOM_S3_TIMEOUT": "2", "STILLROOM_S3_TRIES": "2"}
        proc, seconds = _run_with(endpoint, ["cache-status", f"s3://{BUCKET}/caches/phase1"], **env)
    line = _one_error_line(proc.returncode, proc.stdout + proc.stderr, endpoint, "timeout")
    retries = [x for x in proc.stderr.splitlines() if "retrying: up to 2 tries of 2s each" in x]
    print(f"\ncache-status against a silent server, {seconds:.1f}s: {len(retries)} warnings, {line}")
    # zarr asks for 4 keys at once (zarr.json, .zgroup, .zattrs, .zmetadata): each is tried twice.
    assert len([x for x in retries if "/phase1/zarr.json" in x]) == 2, proc.stderr[-3000:]
    assert seconds < 4 + 20, seconds  # 2 tries x 2 s, back-off and start-up


def test_pipe_shard_naming_no_file_is_refused_from_the_cli(s3: S3, tiny_teacher: str, tmp_path: Path):
    args = cache_cli_args(s3.pattern, tiny_teacher, tmp_path / "c", **CACHE)
    args[args.index("--shards") + 1] = f"pipe:cat {s3.local}/*"
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "pipe:cat" in result.output and "wids index" in result.output, result.output


def test_s3_timeouts_are_checked(monkeypatch):
    from pipeline.errors import ConfigError
    from pipeline.storage import s3 as s3mod

    monkeypatch.setenv("STILLROOM_S3_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="STILLROOM_S3_TIMEOUT"):
        s3mod.timeout_s()
    monkeypatch.setenv("STILLROOM_S3_TRIES", "0")
    with pytest.raises(ConfigError, match="STILLROOM_S3_TRIES"):
        s3mod.tries()
    assert sys.modules["pipeline.storage.s3"] is s3mod
