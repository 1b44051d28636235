"""Reading webdataset shards: URL expansion, shard lists with counts, and validated samples.

Each sample keeps its shard index and its position in the shard: together they address the
sample's cache row. Bad input is never silently dropped: by default it raises
:class:`DataError` naming the shard and key; with ``on_error="skip"`` it is counted in
:class:`SkipStats` and logged.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Literal

import braceexpand
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

from . import storage
from .errors import DataError
from .replay import DecodedSample, decode_image

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
OnError = Literal["raise", "skip"]


@dataclass(frozen=True)
class ShardInfo:
    """One shard: where it is and how many samples it must hold."""

    url: str
    count: int

    @property
    def name(self) -> str:
        """Base name, used as the shard's identity in mixup seeds (stable if the data moves)."""
        return shard_name(self.url)


def shard_name(url: str) -> str:
    return url if storage.is_pipe(url) else storage.basename(url)


@dataclass
class SkipStats:
    """Counts of skipped samples by reason, for the summary line and the metrics file."""

    reasons: Counter = field(default_factory=Counter)

    def skip(self, reason: str, where: str, n: int = 1) -> None:
        self.reasons[reason] += n
        log.warning("skipped %d sample(s) at %s: %s", n, where, reason)

    @property
    def total(self) -> int:
        return sum(self.reasons.values())


def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """Expand brace patterns (``train-{000000..000146}.tar``) and local globs into URLs.

    A string is one spec (a ``pipe:`` command may hold spaces); several specs come as a list.
    Order is preserved (globs are sorted), so the shard list, and with it every cache row
    address, is deterministic.
    """
    specs = [s.strip() for s in ([spec] if isinstance(spec, str) else spec) if s.strip()]
    urls: list[str] = []
    for s in specs:
        for u in braceexpand.braceexpand(s):
            if storage.is_local(u) and any(c in u for c in "*?["):
                matches = sorted(glob.glob(u))
                if not matches:
                    raise DataError(f"shard pattern {u!r} matches no file")
                urls.extend(matches)
            else:
                urls.append(u)
    if not urls:
        raise DataError(f"no shards in {spec!r}")
    dup = [u for u, n in Counter(urls).items() if n > 1]
    if dup:
        raise DataError(f"shard list names {dup[0]!r} more than once")
    return urls


def open_shard(url: str) -> IO[bytes]:
    """Open a shard for streaming: local path, ``pipe:`` command, or any fsspec URL."""
    if storage.is_local(url) and not storage.exists(url):
        raise DataError(f"shard {url!r} does not exist")
    return storage.open_read(url)


def _sidecar_path(url: str) -> str | None:
    """``<dir>/<prefix>.json`` for a local shard ``<dir>/<prefix>-NNNNNN.tar``, if it exists."""
    if not storage.is_local(url):
        return None
    path = storage.local_path(url)
    name = os.path.basename(path)
    if "-" not in name:
        return None
    sidecar = os.path.join(os.path.dirname(path), name.rsplit("-", 1)[0] + ".json")
    return sidecar if os.path.exists(sidecar) else None


def read_sidecar(path: str) -> dict:
    """The pack sidecar: class names and, per shard, its name and sample count."""
    with open(path) as f:
        return json.load(f)


def count_samples(url: str) -> int:
    """Count samples by reading tar headers (no image decode). Fails on a truncated tar."""
    keys: set[str] = set()
    try:
        with open_shard(url) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                prefix, _ = base_plus_ext(member.name) if member.isreg() else (None, None)
                if prefix:
                    keys.add(prefix)
            # tarfile ends the member loop quietly when the stream stops where a header should be (a
            # tar cut inside skipped member data or at a block boundary), so a truncated shard would
            # count short and its missing samples would vanish unnoticed. Only a complete
            # end-of-archive block, read in full at the final offset, proves the scan saw everything.
            if tar.fileobj.tell() < tar.offset + tarfile.BLOCKSIZE:
                raise DataError(
                    f"shard {url!r}: truncated tar (stream ends at byte {tar.fileobj.tell()}, "
                    f"before the end-of-archive block at {tar.offset})"
                )
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"shard {url!r}: cannot read tar ({e})") from e
    return len(keys)


def load_shard_list(spec: str | Sequence[str], counts: dict[str, int] | None = None) -> list[ShardInfo]:
    """Resolve shard URLs and their expected sample counts.

    Counts come from ``counts`` (e.g. a cache's recorded list), else the pack sidecar, else a
    header scan of each tar. A local shard that does not exist is refused here, before any work,
    even when its count is known from a sidecar that still lists it.
    """
    infos = []
    sidecars: dict[str, dict[str, int]] = {}
    urls = expand_urls(spec)
    missing = [u for u in urls if storage.is_local(u) and not storage.exists(u)]
    if missing:
        more = f" ({len(missing) - 1} more missing, e.g. {missing[1]!r})" if len(missing) > 1 else ""
        raise DataError(f"shard {missing[0]!r} does not exist{more}")
    for url in urls:
        name = shard_name(url)
        n = counts.get(name) if counts else None
        side_path = _sidecar_path(url) if n is None else None
        if side_path is not None:
            if side_path not in sidecars:
                meta = read_sidecar(side_path)
                sidecars[side_path] = {s["name"]: int(s["count"]) for s in meta.get("shards", [])}
            n = sidecars[side_path].get(name)
        if n is None:
            n = count_samples(url)
        if int(n) == 0:
            # A shard with no samples is a failed pack or copy, never data; reading it "succeeds" with
            # nothing, so refuse it here, before any teacher compute, rather than train without it.
            raise DataError(f"shard {url!r} holds no samples (empty tar?)")
        infos.append(ShardInfo(url=url, count=int(n)))
    return infos


@dataclass
class RawSample:
    key: str
    shard_index: int
    position: int
    image: bytes
    label: int


def _parse_label(raw: bytes | None, num_classes: int | None) -> int:
    if raw is None:
        raise ValueError("missing .cls")
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        label = int(text)
    except ValueError:
        raise ValueError(f"non-integer .cls {text[:20]!r}") from None
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise ValueError(f"label {label} out of range [0, {num_classes})")
    return label


def iter_raw(
    shard: ShardInfo,
    shard_index: int,
    num_classes: int | None = None,
    on_error: OnError = "raise",
    stats: SkipStats | None = None,
) -> Iterator[RawSample]:
    """Yield validated raw samples of one shard, in tar order, with their positions.

    After the last sample, the number of samples read is compared with ``shard.count``: a
    truncated tar otherwise ends silently.
    """
    stats = stats if stats is not None else SkipStats()
    position = 0
    try:
        stream = open_shard(shard.url)
    except DataError:
        raise
    except Exception as e:  # fsspec / pipe errors come in many types; name the shard whatever they are
        raise DataError(f"shard {shard.url!r}: cannot open ({e})") from e
    try:
        files = ({**f, "__url__": shard.url} for f in tar_file_iterator(stream))
        for sample in group_by_keys(files):
            key = sample["__key__"]
            where = f"shard {shard.url!r} key {key!r}"
            try:
                label = _parse_label(sample.get("cls"), num_classes)
                ext = next((e for e in IMAGE_EXTS if e in sample), None)
                if ext is None:
                    present = sorted(k for k in sample if not k.startswith("__"))
                    raise ValueError(f"no image (.{'/.'.join(IMAGE_EXTS)}) among {present}")
                if not sample[ext]:
                    raise ValueError(f"empty .{ext} file")
            except ValueError as e:
                if on_error == "skip":
                    stats.skip(str(e), where)
                    position += 1
                    continue
                raise DataError(f"{where}: {e}") from None
            yield RawSample(key=key, shard_index=shard_index, position=position, image=sample[ext], label=label)
            position += 1
    except DataError:
        raise
    except Exception as e:
        msg = f"shard {shard.url!r}: unreadable tar after {position} samples ({type(e).__name__}: {e})"
        if on_error != "skip":
            raise DataError(msg) from e
        stats.skip(f"unreadable tar ({type(e).__name__})", f"shard {shard.url!r}", max(shard.count - position, 1))
        return
    finally:
        stream.close()
    if position != shard.count:
        msg = (
            f"shard {shard.url!r}: read {position} samples, expected {shard.count} (truncated tar or wrong shard list?)"
        )
        if on_error != "skip" or position > shard.count:
            raise DataError(msg)
        stats.skip("missing from shard (truncated tar?)", f"shard {shard.url!r}", shard.count - position)


def iter_decoded(
    shard: ShardInfo,
    shard_index: int,
    num_classes: int | None = None,
    on_error: OnError = "raise",
    stats: SkipStats | None = None,
    positions: Container[int] | None = None,
) -> Iterator[DecodedSample]:
    """Like :func:`iter_raw`, with each image decoded once to RGB.

    ``positions``: decode only these (phase 2 trains a part of each shard per epoch); the others are
    still read and checked, so a bad sample is reported wherever it is.
    """
    stats = stats if stats is not None else SkipStats()
    for raw in iter_raw(shard, shard_index, num_classes, on_error, stats):
        if positions is not None and raw.position not in positions:
            continue
        try:
            image = decode_image(raw.image)
        except Exception as e:
            where = f"shard {shard.url!r} key {raw.key!r}"
            if on_error == "skip":
                stats.skip(f"undecodable image ({e})", where)
                continue
            raise DataError(f"{where}: undecodable image ({type(e).__name__}: {e})") from e
        yield DecodedSample(key=raw.key, shard_index=shard_index, position=raw.position, image=image, label=raw.label)


def num_classes_from_sidecar(url: str) -> int | None:
    """The class count recorded by ``stillroom pack`` next to a shard, if there is a sidecar."""
    path = _sidecar_path(url)
    return int(read_sidecar(path)["num_classes"]) if path else None
