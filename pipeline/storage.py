"""Where data lives: local paths, ``file://``, fsspec URLs (``s3://``, ``gs://``...) and ``pipe:`` commands.

Shards and caches are addressed by URL. This module is the one place that tells the kinds apart,
opens them for reading and hashes files, so the rest of the code never inspects URL strings.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from typing import IO

from .errors import StorageError


def is_pipe(url: str) -> bool:
    """A webdataset ``pipe:`` URL: the bytes come from a shell command's standard output."""
    return url.startswith("pipe:")


def is_local(url: str) -> bool:
    """A path on this machine (plain or ``file://``), as opposed to an fsspec URL or a pipe."""
    return not is_pipe(url) and ("://" not in url or url.startswith("file://"))


def local_path(url: str) -> str:
    """The filesystem path of a local URL."""
    return url.removeprefix("file://")


def exists(url: str) -> bool:
    """Whether a local file or a remote object exists (a ``pipe:`` is assumed to)."""
    if is_pipe(url):
        return True
    if is_local(url):
        return os.path.exists(local_path(url))
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return bool(fs.exists(path))


def basename(url: str) -> str:
    """The last path component of a local or remote URL."""
    return posixpath.basename(url.rstrip("/").split("::")[-1])


def open_read(url: str) -> IO[bytes]:
    """Open ``url`` for streaming reads."""
    if is_pipe(url):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    if is_local(url):
        return open(local_path(url), "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


def sha256_file(url: str) -> str:
    """SHA-256 of a file's bytes (e.g. a teacher checkpoint), read in 1 MiB blocks."""
    h = hashlib.sha256()
    try:
        with open_read(url) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise StorageError(f"cannot read {url!r}: {e}") from e
    return h.hexdigest()


def tree_size(url: str) -> int:
    """Bytes stored under a local folder (0 for remote URLs)."""
    if not is_local(url):
        return 0
    total = 0
    for root, _, files in os.walk(local_path(url)):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total
