"""Decoding a sample's image bytes to 8-bit RGB, once per sample, for view replay.

The decoder is the first place where the environment can change pixels (another libjpeg build or
CPU path gives other numbers for the same bytes): phase 1 records digests of replayed pixels so
that phase 2 notices (``docs/cache-format.md``).
"""

from __future__ import annotations

import io
import re
from collections.abc import Container, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.errors import DataError
from pipeline.interrupt import stop_if_asked
from pipeline.shards.lists import ShardInfo
from pipeline.shards.samples import OnError, SkipStats, iter_raw


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes (JPEG/PNG/WebP/TIFF/BMP/GIF) to an 8-bit RGB PIL image.

    Grayscale, palette, CMYK, YCbCr and alpha modes go through PIL's own conversion. PIL would clip
    high-bit-depth modes (most pixels of a 16-bit scan become 255), so they are scaled instead:
    ``I;16*`` (and ``I`` holding 0..65535) by 255/65535, ``F`` holding 0..1 by 255, rounded. An
    ``I`` or ``F`` image outside those ranges has no scale anyone could agree on and is refused.

    Raises:
        OSError / ValueError when the bytes are not a readable image or its mode cannot be converted
        (the readers turn either into a DataError naming the shard and key).
    """
    img = Image.open(io.BytesIO(data))
    img.load()  # force the full decode here, so a truncated file fails now, not mid-augmentation
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        return _wide_to_rgb(img)
    return img.convert("RGB")


def _wide_to_rgb(img: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float grayscale image scaled (not clipped) to 8-bit RGB."""
    arr = np.asarray(img)
    if img.mode == "F":
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise ValueError(
                f"float (F) image with values in [{arr.min():g}, {arr.max():g}]: only 0..1 has a known scale"
            )
        scaled = np.rint(arr.astype(np.float64) * 255.0)
    else:
        if arr.min() < 0 or arr.max() > 65535:
            raise ValueError(
                f"{img.mode} image with values in [{arr.min()}, {arr.max()}]: only 0..65535 (16-bit) has a known scale"
            )
        scaled = (arr.astype(np.int64) * 255 + 32767) // 65535  # round(v * 255 / 65535) in integers
    return Image.fromarray(scaled.astype(np.uint8)).convert("RGB")


@dataclass
class DecodedSample:
    """A sample of a shard after decoding: what view replay needs."""

    key: str
    shard_index: int
    position: int
    image: Image.Image
    label: int
    digest: int = 0  # a hash of the stored image bytes (pipeline.shards.samples.image_digest); 0 = unknown


def _stable(e: Exception) -> str:
    """An error's message without object addresses (PIL names ``<_io.BytesIO object at 0x...>``), so
    skip reasons are the same from one read to the next and can be counted together."""
    return re.sub(r"<([\w.]+) object at 0x[0-9a-f]+>", r"<\1>", str(e))


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
        stop_if_asked()  # a loader worker sent SIGTERM stops here, between samples
        if positions is not None and raw.position not in positions:
            continue
        try:
            image = decode_image(raw.image)
        except Exception as e:
            where = f"shard {shard.url!r} key {raw.key!r}"
            if on_error == "skip":
                stats.skip(f"undecodable image ({_stable(e)})", where)
                continue
            raise DataError(f"{where}: undecodable image ({type(e).__name__}: {_stable(e)})") from e
        yield DecodedSample(raw.key, shard_index, raw.position, image, raw.label, digest=raw.digest)
