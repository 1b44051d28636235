"""Stable, content-addressed seeds.

Every random decision of a view, an epoch plan or a mixing pair is drawn from generators seeded by
:func:`stable_seed` from an identity alone (cache seed, view id, sample key...). Python's ``hash``
is salted per process, so BLAKE2 is used instead: the same identity gives the same seed on any
machine, rank or worker. No torch here: the reading layer imports this module.
"""

from __future__ import annotations

import hashlib
import random


def hash64(text: str) -> int:
    """A 64-bit integer from BLAKE2b of ``text``: the same on every machine and process."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def stable_seed(*parts: object) -> int:
    """Return a 63-bit integer derived from ``parts`` only.

    Args:
        *parts: Values whose ``str`` forms identify the random stream (e.g. seed, view, key).

    Returns:
        A non-negative integer usable by ``random.Random`` and ``torch.Generator``.
    """
    return hash64("\x1f".join(str(p) for p in parts)) & ((1 << 63) - 1)


def shuffled(count: int, *identity: object) -> list[int]:
    """A permutation of ``range(count)`` that depends on ``identity`` only (e.g. seed, view, shard)."""
    order = list(range(count))
    random.Random(stable_seed(*identity)).shuffle(order)
    return order
