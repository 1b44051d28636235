"""The store below zarr's array API: metadata documents, listings and conditional writes.

The one module that touches zarr's internals (``zarr.core.sync``): ``pyproject.toml`` pins zarr to the
minor series this was written and tested against.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from zarr.abc.store import Store
from zarr.buffer import default_buffer_prototype
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from pipeline import storage


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def open_store(url: str, writable: bool) -> Store:
    if storage.is_local(url):
        return LocalStore(storage.local_path(url), read_only=not writable)
    return FsspecStore.from_url(url, read_only=not writable)


def get_bytes(store: Store, key: str) -> bytes | None:
    buf = sync(store.get(key, prototype=default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def put_bytes(store: Store, key: str, data: bytes, overwrite: bool) -> None:
    buf = default_buffer_prototype().buffer.from_bytes(data)
    sync(store.set(key, buf) if overwrite else store.set_if_not_exists(key, buf))


def exists(store: Store, key: str) -> bool:
    return bool(sync(store.exists(key)))


def delete_all(store: Store) -> None:
    sync(store.delete_dir(""))


async def _collect(keys: AsyncIterator[str]) -> list[str]:
    return [k async for k in keys]


def list_keys(store: Store, prefix: str) -> list[str]:
    """Every stored key under ``prefix``, without the in-flight temp files of a local store."""
    return [k for k in sync(_collect(store.list_prefix(prefix))) if not k.endswith(".partial")]


def top_level(store: Store) -> set[str]:
    return {k for k in sync(_collect(store.list_dir(""))) if not k.endswith(".partial")}


def read_json(data: bytes | None) -> dict[str, Any] | None:
    return None if data is None else json.loads(data)


def run(coroutine: Any) -> Any:
    """Run one of zarr's coroutines (e.g. several chunk reads gathered) on zarr's event loop."""
    return sync(coroutine)


# A unit whose data equals the fill value must not vanish: zarr would not store such a chunk.
ARRAY_CONFIG = {"write_empty_chunks": True}
# zstd's own frame checksum: a corrupt chunk fails to decode instead of decoding to other numbers.
COMPRESSOR = ZstdCodec(level=0, checksum=True)


def _blosc(level: int, shuffle: str, typesize: int) -> tuple[Any, ...]:
    # Blosc does not notice a flipped bit (most decode into other numbers): a CRC32C after it does.
    return (BloscCodec(cname="zstd", clevel=level, shuffle=shuffle, typesize=typesize), Crc32cCodec())


# Per array, the smallest chain measured that still fails to decode on any flipped bit
# (bench/codecs.py: 26.7 bytes per (sample, view) at K=10, T=2 against 32.1 with zstd alone, decoding
# as fast). Encoding costs ~50-100 ms a unit, in phase 1's writer thread.
COMPRESSORS: dict[str, tuple[Any, ...]] = {
    "values": _blosc(7, "shuffle", 2),
    "indices": _blosc(9, "bitshuffle", 2),
    "logsumexp": _blosc(9, "bitshuffle", 4),
    "pixel_digests": _blosc(5, "bitshuffle", 4),
    "labels": _blosc(5, "bitshuffle", 4),
    "keys": (ZstdCodec(level=19, checksum=True),),
    "digests": (COMPRESSOR,),
    "done": (COMPRESSOR,),
}
