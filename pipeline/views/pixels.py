"""Compact pixels: how a finished view travels between processes and becomes a model's input.

A view is uint8 CHW while its pixels are whole numbers (no random erasing, no mixup), else float16;
the model sees ``float32(float16(x))`` either way (:func:`model_input`), whatever else is in its
batch, so the teacher in phase 1 and the student in phase 2 get the same numbers. Batches of compact
views are built with :func:`stack_views` and joined with :func:`join_batches`: unlike ``torch.stack``
and ``torch.cat`` they turn a uint8 part into exactly the float16 :func:`model_input` gives it when
other parts are float16.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
from torch.utils.data import get_worker_info

from pipeline.seeding import stable_seed


def compact(x: torch.Tensor) -> torch.Tensor:
    """A finished view as it travels and is stored: uint8 stays uint8, anything else becomes float16."""
    return x if x.dtype == torch.uint8 else x.to(torch.float16)


# float16(k / 255) for every uint8 k, computed once on the CPU: a table lookup gives the same numbers on
# any device, where a division on an accelerator might round differently.
_UINT8_TO_HALF = (torch.arange(256, dtype=torch.float32) / 255.0).to(torch.float16)


def model_input(pixels: torch.Tensor) -> torch.Tensor:
    """float32 model input from compact pixels (a view or a batch): ``float32(float16(x))`` for both kinds.

    uint8 value ``k`` becomes ``float16(k / 255)``, exactly as :func:`stack_views` turns a uint8 view that
    shares a batch with float16 views, so a view's input does not depend on its batch or its device.
    """
    if pixels.dtype == torch.uint8:
        pixels = _UINT8_TO_HALF.to(pixels.device)[pixels.long()]
    return pixels.float()


def join_batches(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Join batches of compact pixels: uint8 if every part is uint8 (1 byte per value), else float16
    (2 bytes), a uint8 part turned into exactly the float16 :func:`model_input` would give it.

    In a DataLoader worker the result is made in shared memory, as ``default_collate`` makes its batches:
    sending it to the main process then passes a handle instead of copying the chunk once more.
    """
    parts = list(parts)
    shape = (sum(len(p) for p in parts), *parts[0].shape[1:])
    if all(p.dtype == torch.uint8 for p in parts):
        return torch.cat(parts, out=_new_batch(shape, torch.uint8, parts[0].device))
    if any(p.dtype not in (torch.uint8, torch.float16) for p in parts):
        return torch.cat([model_input(p).to(torch.float16) if p.dtype == torch.uint8 else p for p in parts])
    out = _new_batch(shape, torch.float16, parts[0].device)
    at = 0
    for p in parts:
        dst = out[at : at + len(p)]
        if p.dtype != torch.uint8:
            dst.copy_(p)
        elif p.device.type == "cpu":
            # float16(float32(k) / 255) is the table's definition, and a CPU divides by IEEE rules: the same
            # numbers (tests/test_loader_identity.py checks every k) at a quarter of the cost of the lookup.
            dst.copy_(p.float().div_(255.0))
        else:
            dst.copy_(model_input(p))
        at += len(p)
    return out


def _new_batch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An empty batch tensor: in shared memory inside a DataLoader worker on the CPU, else ordinary memory."""
    if device.type != "cpu" or get_worker_info() is None:
        return torch.empty(shape, dtype=dtype, device=device)
    template = torch.empty(0, dtype=dtype)
    storage = template._typed_storage()._new_shared(math.prod(shape), device="cpu")
    return template.new(storage).resize_(shape)


def stack_views(views: Sequence[torch.Tensor]) -> torch.Tensor:
    """One batch tensor from compact views (see :func:`join_batches`)."""
    return join_batches([v[None] for v in views])


# At most 1 row in this many of a view carries a digest of its replayed pixels in the cache; phase 2 and
# verify-cache recompute it, so another decoder or CPU path that changes a single pixel is caught, not only
# another image file.
PIXEL_CHECK_EVERY = 16


def check_period(views: int) -> int:
    """``n``: a view's checked rows are 1 in ``n``, ``n`` = 16, or the cache's view count when smaller, so that
    the checked rows, rotating with the view, cover every row across any ``n`` consecutive views."""
    return max(1, min(PIXEL_CHECK_EVERY, views))


def check_offset(seed: int, shard: str, views: int) -> int:
    """Where the rotation of the checked rows starts in a shard (seeded, so shards do not all start at row 0)."""
    return stable_seed("pixel-check", seed, shard) % check_period(views)


def checked_row(seed: int, views: int, view: int, shard: str, position: int) -> bool:
    """Whether (view, shard, position) is one of the rows whose replayed pixels the cache records.

    Row ``p`` of a shard is checked in view ``v`` when ``(p + offset) % n == v % n`` (:func:`check_period`,
    :func:`check_offset`): every image is checked in every ``n``-th view, so in at least one of the cache's
    ``views`` (format 4; format 3 drew 1 row in 16 per view at random, leaving most images of a few-view cache
    never checked).
    """
    n = check_period(views)
    return (position + check_offset(seed, shard, views)) % n == view % n


def pixel_digest(pixels: torch.Tensor) -> int:
    """A 32-bit digest of a view's compact pixels (dtype and shape included); never 0 (the cache's "none")."""
    h = hashlib.blake2b(digest_size=4, person=b"stillroom-pixels")
    h.update(f"{pixels.dtype}{tuple(pixels.shape)}".encode())
    h.update(pixels.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(h.digest(), "little") or 1
