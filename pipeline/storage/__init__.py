"""Where data lives: local paths, ``file://``, fsspec URLs (``s3://``, ``gs://``...) and ``pipe:`` commands.

Shards, indexes, sidecars and caches are addressed by URL. This module is the one place that tells
the kinds apart, opens them, joins relative names onto them, measures them and turns a storage
fault (an endpoint that refuses connections or does not answer) into one :class:`StorageError`
naming the URL, so the rest of the code never inspects URL strings.

``s3://`` goes through :mod:`pipeline.storage.s3` (s3fs with stated timeouts and retries, see
``docs/object-storage.md``); it is imported only when an ``s3://`` URL is first used.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import shlex
import sys
from collections.abc import Iterator
from typing import IO
from urllib.parse import urlsplit

import fsspec

from pipeline.errors import StillroomError, StorageError

# Modules whose exceptions are storage faults (an endpoint that refuses or does not answer, missing
# credentials): turned into one StorageError line naming the URL. register_backend extends it.
FAULT_MODULES: set[str] = {"aiohttp"}


def register_backend(
    protocols: tuple[str, ...], filesystem: str | type, fault_modules: tuple[str, ...] = (), install: str = ""
) -> None:
    """Make ``protocols`` (e.g. ``("s3", "s3a")``) use ``filesystem`` (an fsspec class, or its dotted path:
    imported only when such a URL is first used), for shards and caches alike (zarr goes through fsspec),
    and treat exceptions from ``fault_modules`` as storage faults (one error line naming the URL).

    A backend's timeouts and retries belong to its filesystem class: see :mod:`pipeline.storage.s3` for the pattern
    (stated timeouts, a bounded number of tries, a warning per failed try).
    """
    errtxt = f"{protocols[0]}:// URLs need {install or 'an fsspec filesystem for them'}"
    for protocol in protocols:
        fsspec.register_implementation(protocol, filesystem, clobber=True, errtxt=errtxt)
    FAULT_MODULES.update(fault_modules)


def _register_s3() -> None:
    """Every S3 filesystem (ours, zarr's) is stillroom's s3fs, with its timeouts and retries.

    By name, so that s3fs is imported only when an ``s3://`` URL is used; by class if something
    already imported s3fs (fsspec would keep the plain class it has registered).
    """
    cls: str | type = "pipeline.storage.s3.S3FileSystem"
    if "s3fs" in sys.modules:
        from pipeline.storage.s3 import S3FileSystem

        cls = S3FileSystem
    faults = ("botocore", "aiobotocore", "s3fs")
    register_backend(("s3", "s3a"), cls, faults, install="s3fs: pip install 'stillroom[s3]' (or pip install s3fs)")


_register_s3()

# What a ``pipe:`` command reads is named by its last argument ending like a tar file.
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")


def is_pipe(url: str) -> bool:
    """A webdataset ``pipe:`` URL: the bytes come from a shell command's standard output."""
    return url.startswith("pipe:")


def is_local(url: str) -> bool:
    """A path on this machine (plain or ``file://``), as opposed to an fsspec URL or a pipe."""
    return not is_pipe(url) and ("://" not in url or url.startswith("file://"))


def local_path(url: str) -> str:
    """The filesystem path of a local URL."""
    return url.removeprefix("file://")


def basename(url: str) -> str:
    """The last path component of a local or remote URL (without a query string)."""
    path = url.split("::")[-1]
    if "://" in path and not path.startswith("file://"):
        path = urlsplit(path).path
    return posixpath.basename(path.rstrip("/"))


def pipe_target(url: str) -> str | None:
    """The file a ``pipe:`` command reads: its last argument that ends like a tar file, else None.

    ``pipe:cat /data/train-000000.tar`` and ``pipe:aws s3 cp s3://b/train-000000.tar -`` both name
    ``train-000000.tar``; a shard's identity must not depend on how its bytes are fetched.
    """
    try:
        args = shlex.split(url.removeprefix("pipe:"))
    except ValueError:
        return None
    for arg in reversed(args):
        path = urlsplit(arg).path if "://" in arg else arg
        if path.lower().endswith(TAR_SUFFIXES):
            return arg
    return None


def dirname(url: str) -> str:
    """The folder of a local path or URL (``""`` for a bare file name)."""
    if is_local(url):
        prefix = "file://" if url.startswith("file://") else ""
        return prefix + os.path.dirname(local_path(url))
    return url.rsplit("/", 1)[0] if "/" in url.split("://", 1)[-1] else url


def join(base: str, name: str) -> str:
    """``name`` resolved against the folder ``base`` (absolute paths, URLs and pipes are kept)."""
    if is_pipe(name) or "://" in name or name.startswith("/") or not base:
        return name
    if is_local(base):
        prefix = "file://" if base.startswith("file://") else ""
        return prefix + os.path.normpath(os.path.join(local_path(base), name))
    scheme, rest = base.split("://", 1)
    return f"{scheme}://{posixpath.normpath(posixpath.join(rest, name))}"


def real_path(url: str) -> str:
    """One spelling per local file (``a/x.tar``, ``b/../a/x.tar`` and a symlink agree); URLs as given."""
    return os.path.realpath(local_path(url)) if is_local(url) else url


def fault(e: BaseException) -> BaseException | None:
    """The storage fault behind ``e`` (unreachable or silent endpoint, missing credentials), if any.

    Walks the exception's causes: zarr, fsspec and DataLoader wrappers hide the network error.
    """
    if isinstance(e, FileNotFoundError):  # an answer from a reachable store; callers name the file
        return None
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        module = type(cur).__module__.split(".")[0]
        if module in FAULT_MODULES or (
            isinstance(cur, (ConnectionError, TimeoutError)) and not isinstance(cur, BrokenPipeError)
        ):
            return cur
        if type(cur).__name__ == "FSTimeoutError":
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


def storage_error(e: BaseException, url: str | None = None) -> StorageError | None:
    """A one-line :class:`StorageError` for a storage fault behind ``e`` (None if it is not one)."""
    if isinstance(e, StorageError):
        return e
    cause = fault(e)
    if cause is None:
        return None
    text = " ".join(str(cause).split()) or type(cause).__name__
    where = f"{url!r}: " if url else ""
    return StorageError(f"{where}storage request failed ({type(cause).__name__}: {text})")


@contextlib.contextmanager
def guard(url: str) -> Iterator[None]:
    """Turn a storage fault while working on ``url`` into a :class:`StorageError` naming it."""
    try:
        yield
    except StillroomError:
        raise
    except ImportError as e:
        raise StorageError(f"{url!r}: {e}") from e
    except Exception as e:
        err = storage_error(e, url)
        if err is None:
            raise
        raise err from e


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise StorageError(f"{url!r}: {e}") from e


def exists(url: str) -> bool:
    """Whether a local file or a remote object exists (a ``pipe:`` is assumed to)."""
    if is_pipe(url):
        return True
    if is_local(url):
        return os.path.exists(local_path(url))
    with guard(url):
        fs, path = _fs(url)
        return bool(fs.exists(path))


def open_read(url: str) -> IO[bytes]:
    """Open ``url`` for streaming reads (large blocks: the whole file is wanted)."""
    if is_pipe(url):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    if is_local(url):
        return open(local_path(url), "rb")
    with guard(url):
        fs, path = _fs(url)
        return fs.open(path, "rb")


# A header scan reads a 512-byte tar header, then seeks over the member's data. On object storage each
# miss is one ranged GET of the header plus this much read-ahead, which also covers the small members
# that follow an image (.cls, .json) and the next sample's header: about one GET of a few KB per sample.
HEADER_READAHEAD = 4096


def open_ranged(url: str) -> tuple[IO[bytes], int]:
    """Open ``url`` for small random reads (tar header scans); returns the file and its size.

    Local files are opened unbuffered (each read is exactly what tarfile asks for); remote files
    read ranges with :data:`HEADER_READAHEAD` bytes of read-ahead, never megabytes.
    """
    if is_local(url):
        f = open(local_path(url), "rb", buffering=0)  # noqa: SIM115 (the caller closes it)
        return f, os.fstat(f.fileno()).st_size
    with guard(url):
        fs, path = _fs(url)
        f = fs.open(path, "rb", block_size=HEADER_READAHEAD, cache_type="readahead")
        return f, int(f.size)


def read_bytes(url: str) -> bytes:
    """The whole content of a small file (an index, a sidecar)."""
    with guard(url), open_read(url) as f:
        return f.read()


def sha256_file(url: str) -> str:
    """SHA-256 of a file's bytes (e.g. a teacher checkpoint), read in 1 MiB blocks."""
    h = hashlib.sha256()
    try:
        with guard(url), open_read(url) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise StorageError(f"cannot read {url!r}: {e}") from e
    return h.hexdigest()


def tree_size(url: str) -> int:
    """Bytes stored under a local folder or a remote prefix (what ``cache-status`` reports)."""
    if is_local(url):
        total = 0
        for root, _, files in os.walk(local_path(url)):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        return total
    with guard(url):
        fs, path = _fs(url)
        return int(fs.du(path, total=True)) if fs.exists(path) else 0
