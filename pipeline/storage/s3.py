"""s3fs with stated timeouts and retries, registered by :mod:`pipeline.storage` for ``s3://``.

Out of the box, s3fs retries a silent endpoint five times, and botocore retries each of those
again, each attempt waiting up to 15 s for an answer: a job facing a dead endpoint hangs for many
minutes without a word. Here every S3 filesystem (the shards' and the zarr cache's) waits at most
``STILLROOM_S3_TIMEOUT`` seconds (default 30) for a connection or an answer, tries
``STILLROOM_S3_TRIES`` times (default 5; refused connections too), logs a warning on every failed
try, then gives up with an error naming the endpoint URL. Explicit ``config_kwargs`` (e.g. from
fsspec's configuration) still win.

Imported only when an ``s3://`` URL is used, so that s3fs stays an optional extra (``[s3]``).
"""

from __future__ import annotations

import logging
import os

import s3fs
from botocore.exceptions import EndpointConnectionError
from s3fs.core import add_retryable_error

from pipeline.errors import ConfigError

TIMEOUT_ENV = "STILLROOM_S3_TIMEOUT"
TRIES_ENV = "STILLROOM_S3_TRIES"


def _env_number(name: str, default: float, kind: type) -> float:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"${name}={raw!r}: expected a number") from None
    if value <= 0:
        raise ConfigError(f"${name}={raw!r}: must be > 0")
    return value


def timeout_s() -> float:
    """Seconds an S3 request waits for a connection, and then for each answer."""
    return float(_env_number(TIMEOUT_ENV, 30.0, float))


def tries() -> int:
    """Attempts per S3 request before giving up."""
    return int(_env_number(TRIES_ENV, 5, int))


class _RetryWarnings(logging.Filter):
    """Turn s3fs's debug note of a failed try into one warning line; drop its other debug chatter."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.INFO:
            return True
        if not str(record.msg).startswith("Retryable error"):
            return False
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg = "S3 request failed (%s); retrying: up to %d tries of %gs each (set $%s, $%s)"
        record.args = (*record.args, tries(), timeout_s(), TRIES_ENV, TIMEOUT_ENV)
        return True


def _quiet_logs() -> None:
    # botocore logs "Found credentials in environment variables" (INFO) for every new client: noise.
    for name in ("botocore.credentials", "aiobotocore.credentials", "botocore.configprovider"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if "S3FS_LOGGING_LEVEL" not in os.environ:  # someone debugging s3fs gets its full log instead
        s3log = logging.getLogger("s3fs")
        s3log.setLevel(logging.DEBUG)
        s3log.addFilter(_RetryWarnings())


_quiet_logs()
# A refused connection (an endpoint restarting) is worth the same retries as a silent one.
add_retryable_error(EndpointConnectionError)


class S3FileSystem(s3fs.S3FileSystem):
    """s3fs with the timeouts and retries above; everything else is s3fs's."""

    def __init__(self, *args, config_kwargs: dict | None = None, **kwargs):
        config = dict(config_kwargs or {})
        config.setdefault("connect_timeout", timeout_s())
        config.setdefault("read_timeout", timeout_s())
        # s3fs retries (below); botocore's own retries would multiply them.
        config.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
        self.retries = tries()
        super().__init__(*args, config_kwargs=config, **kwargs)
