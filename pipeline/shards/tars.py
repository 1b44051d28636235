"""Tar shards as webdataset reads them: which members form samples, counting samples from headers,
and streaming members.

* A tar member belongs to a sample when it is a regular file whose name splits, as webdataset
  splits it, into a key and an extension at the first dot of its base name (``a.b/c.seg.png``:
  key ``a.b/c``, extension ``seg.png``). Hidden files (a base name starting with a dot, such as
  macOS ``._c.jpg``) and webdataset's ``__meta__`` files are not part of any sample.
* A sample is a run of consecutive members with one key; an extension seen twice in a run starts a
  new sample (so two back-to-back copies of a sample are two samples).
* A shard's count is its number of samples, bad ones and duplicates included, so that skipping one
  leaves a gap and never shifts the positions after it.

Counting seeks over member data (a few KB read per sample, locally or on object storage). Streaming
goes through webdataset's own tar iterator, imported only when a shard is streamed: listing or
counting shards never imports torch.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterable, Iterator
from typing import IO, TypeVar

from pipeline import storage
from pipeline.errors import DataError, StorageError

T = TypeVar("T")
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd magic
# webdataset's own split of a member name into (key, extensions) at the first dot of the base name.
_BASE_PLUS_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def member_key(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a tar member that belongs to a sample, else None (see the module doc)."""
    if _META.match(name) or ("/" not in name and name.startswith("__") and name.endswith("__")):
        return None
    if name.rsplit("/", 1)[-1].startswith("."):
        return None
    m = _BASE_PLUS_EXT.match(name)
    if not m:
        return None
    return m.group(1), m.group(2).lower()


def group_samples(members: Iterable[tuple[str, T]]) -> Iterator[tuple[str, dict[str, T]]]:
    """Group ``(member name, payload)`` pairs into ``(key, {extension: payload})`` samples, in tar order."""
    key, sample = "", {}
    for name, payload in members:
        parsed = member_key(name)
        if parsed is None:
            continue
        k, ext = parsed
        if sample and (k != key or ext in sample):
            yield key, sample
            sample = {}
        key = k
        sample[ext] = payload
    if sample:
        yield key, sample


def _truncated(url: str, detail: str) -> DataError:
    return DataError(f"shard {url!r}: truncated tar ({detail})")


def _scan_seekable(f: IO[bytes], size: int, url: str) -> list[str]:
    """Member names from the headers of an uncompressed tar, seeking over member data."""
    names = []
    with tarfile.open(fileobj=f, mode="r:") as tar:
        for m in tar:
            if m.isreg():
                if m.offset_data + m.size > size:
                    need = m.offset_data + m.size
                    raise _truncated(url, f"member {m.name!r} needs bytes up to {need}, the file has {size}")
                names.append(m.name)
            tar.members = []  # a long shard's TarInfos are not needed after their names
        end = tar.offset
    # tarfile ends the member loop quietly where a header should be but is cut short or missing, and
    # also at a damaged header: only a complete zero block at the final offset proves the scan saw all.
    if end + tarfile.BLOCKSIZE > size:
        raise _truncated(url, f"file ends at byte {size}, before the end-of-archive block at {end}")
    f.seek(end)
    if f.read(tarfile.BLOCKSIZE).strip(b"\0"):
        raise DataError(f"shard {url!r}: damaged tar (no valid header at byte {end}, {size - end} bytes from the end)")
    return names


def _scan_stream(f: IO[bytes], url: str) -> list[str]:
    """Member names from a compressed tar or a pipe: the whole stream is read (no way to seek)."""
    names = []
    with tarfile.open(fileobj=f, mode="r|*") as tar:
        for m in tar:
            if m.isreg():
                names.append(m.name)
        at = tar.fileobj.tell()
        if at < tar.offset + tarfile.BLOCKSIZE:
            raise _truncated(url, f"stream ends at byte {at}, before the end-of-archive block at {tar.offset}")
    return names


def count_samples(url: str) -> int:
    """Count the samples of a shard from its tar headers (no image read). Fails on a truncated tar.

    An uncompressed local or remote tar is scanned by seeking over member data: a few KB are read
    per sample. A compressed tar or a ``pipe:`` has to be streamed whole.
    """
    try:
        with storage.guard(url):
            if storage.is_pipe(url):
                with storage.open_read(url) as f:
                    names = _scan_stream(f, url)
            else:
                f, size = storage.open_ranged(url)
                with f:
                    compressed = f.read(4).startswith(_COMPRESSED)
                    f.seek(0)
                    if compressed:
                        with storage.open_read(url) as whole:
                            names = _scan_stream(whole, url)
                    else:
                        names = _scan_seekable(f, size, url)
    except FileNotFoundError:
        raise DataError(f"shard {url!r} does not exist") from None
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"shard {url!r}: cannot read tar ({e})") from e
    return sum(1 for _ in group_samples((n, None) for n in names))


def open_shard(url: str) -> IO[bytes]:
    """Open a shard for streaming: local path, ``pipe:`` command, or any fsspec URL."""
    if storage.is_local(url) and not storage.exists(url):
        raise DataError(f"shard {url!r} does not exist")
    try:
        with storage.guard(url):
            return storage.open_read(url)
    except (DataError, StorageError):
        raise
    except FileNotFoundError:
        raise DataError(f"shard {url!r} does not exist") from None
    except Exception as e:  # fsspec / pipe errors come in many types; name the shard whatever they are
        raise DataError(f"shard {url!r}: cannot open ({e})") from e


def iter_members(stream: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """``(name, bytes)`` of the tar members that belong to samples, streaming (webdataset's iterator)."""
    from webdataset.tariterators import tar_file_iterator  # imports torch: only when a shard is read

    for member in tar_file_iterator(stream, select_files=lambda name: member_key(name) is not None):
        yield member["fname"], member["data"]
