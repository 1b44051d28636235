"""Stable, content-addressed seeds.

Every random decision of a view is drawn from generators seeded here, from the identity of the
view alone (cache seed, view id, sample key). Python's ``hash`` is salted per process, so BLAKE2
is used instead: the same identity gives the same seed on any machine, rank or worker.
"""

from __future__ import annotations

import hashlib
import random

import torch


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


def view_generators(seed: int, view: int, key: str) -> tuple[random.Random, torch.Generator]:
    """Explicit generators for one (sample, view); no global RNG is read or changed.

    Returns:
        A ``random.Random`` for geometric and photometric choices and a ``torch.Generator`` for
        tensor noise (random-erasing pixels). Both are private to this view.
    """
    base = stable_seed("view", seed, view, key)
    rng = random.Random(base)
    gen = torch.Generator().manual_seed(stable_seed("noise", base))
    return rng, gen


def shuffled(count: int, *identity: object) -> list[int]:
    """A permutation of ``range(count)`` that depends on ``identity`` only (e.g. seed, view, shard)."""
    order = list(range(count))
    random.Random(stable_seed(*identity)).shuffle(order)
    return order
