"""Local files a command writes: output folders proven writable before any work, small files written whole,
record lines appended, and a failed write (a full disk, a read-only folder, a file where a folder should be)
as one :class:`~pipeline.errors.StorageError` line naming the path, with nothing half-written left behind."""

from __future__ import annotations

import contextlib
import errno
import os

from pipeline.errors import StorageError

_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a file is in the way where a folder should be",
    errno.EISDIR: "a folder is in the way where a file should be",
}


def os_reason(e: OSError) -> str:
    """Why a write failed, in words (what the user can act on: space, permissions, something in the way)."""
    return _REASONS.get(e.errno or 0) or e.strerror or f"{type(e).__name__}: {e}"


def writable_folder(path: str, flag: str) -> None:
    """Create the local folder ``path`` if needed and prove a file can be written in it, before any work.

    Raises:
        StorageError: ``path`` is a file, or the folder cannot be created or written; names ``flag`` and ``path``.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise StorageError(f"{flag} {path!r} is a file, not a folder: name a folder (the file is left as it is)")
    probe = os.path.join(path, f".stillroom-write-test-{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise StorageError(f"{flag} {path!r} cannot be written: {os_reason(e)}") from None


def write_text(path: str, text: str) -> None:
    """Write a small file whole: a temp file beside it, then a rename; a failure removes the temp file.

    Raises:
        StorageError: the file cannot be written, naming it and why.
    """
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise StorageError(f"cannot write {path!r}: {os_reason(e)}") from None


def append_text(path: str, text: str) -> None:
    """Append to a record (``metrics.jsonl``); a line cut short by a full disk is skipped by its readers.

    Raises:
        StorageError: the file cannot be appended to, naming it and why.
    """
    try:
        with open(path, "a") as f:
            f.write(text)
    except OSError as e:
        raise StorageError(f"cannot append to {path!r}: {os_reason(e)}") from None
