"""Decoding every PIL image mode a shard can hold to the 8-bit RGB both phases replay from.

For each mode and each format that can store it (PNG, JPEG, WebP, TIFF, BMP, GIF, read from a tar
shard like any sample), the decoded RGB must equal a reference conversion: PIL's own for the 8-bit
modes, and a scaled one for the high-bit-depth modes (a 16-bit gradient becomes the 8-bit gradient,
not a wall of 255). Modes with no agreed scale (32-bit integers beyond 16 bits, floats outside 0..1)
are refused as a DataError naming the shard and key, never clipped.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import webdataset as wds
from photos import encode, photo, to_mode
from PIL import Image

from pipeline.errors import DataError
from pipeline.shards.decode import decode_image, iter_decoded
from pipeline.shards.lists import load_shard_list

FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "TIFF": "tif", "BMP": "bmp", "GIF": "gif"}
LOSSY = {"JPEG", "WEBP"}
EIGHT_BIT = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa"]


def _writable(img: Image.Image, fmt: str) -> bytes | None:
    try:
        return encode(img, fmt)
    except (OSError, ValueError, KeyError):
        return None


def _case_ids() -> list[tuple[str, str]]:
    """Every (mode, format) pair Pillow can write, decided here rather than listed by hand."""
    base = photo(5, (40, 30))
    return [(m, f) for m in EIGHT_BIT for f in FORMATS if _writable(to_mode(base, m), f) is not None]


def _shard_of(tmp_path, samples: dict[str, tuple[str, bytes]]) -> str:
    url = str(tmp_path / "modes-000000.tar")
    with wds.TarWriter(url) as sink:
        for key, (ext, data) in samples.items():
            sink.write({"__key__": key, ext: data, "cls": b"0"})
    return url


def _decoded_through_a_shard(tmp_path, ext: str, data: bytes) -> Image.Image:
    [shard] = load_shard_list(_shard_of(tmp_path, {"x": (ext, data)}))
    [sample] = list(iter_decoded(shard, 0, 1))
    assert sample.image.mode == "RGB"
    return sample.image


@pytest.mark.parametrize(("mode", "fmt"), _case_ids(), ids=lambda v: v)
def test_eight_bit_modes_decode_to_their_rgb(tmp_path, mode, fmt):
    img = to_mode(photo(5, (40, 30)), mode)
    data = encode(img, fmt)
    got = np.asarray(_decoded_through_a_shard(tmp_path, FORMATS[fmt], data), np.int16)
    stored = Image.open(io.BytesIO(data))
    stored.seek(0)
    expected = np.asarray(stored.convert("RGB"), np.int16)  # PIL's conversion of what the file holds
    assert got.shape == expected.shape == (30, 40, 3)
    assert np.array_equal(got, expected), (mode, fmt)
    # And what the file holds is the image that was written (lossless formats), up to the mode's colours.
    if fmt not in LOSSY and fmt != "GIF" and mode not in ("P", "PA"):
        assert np.abs(got - np.asarray(img.convert("RGB"), np.int16)).max() <= 1, (mode, fmt)


def _gradient8() -> np.ndarray:
    """A horizontal 0..255 gradient, 256 x 8 pixels."""
    return np.tile(np.arange(256, dtype=np.uint8), (8, 1))


def _wide_images() -> dict[str, Image.Image]:
    g = _gradient8().astype(np.uint32)
    wide = (g * 257).astype(np.uint16)  # 0..65535, as a 16-bit scan of the 8-bit gradient
    size = (wide.shape[1], wide.shape[0])
    return {
        "I;16": Image.fromarray(wide),
        "I;16B": Image.frombytes("I;16B", size, wide.astype(">u2").tobytes()),
        "I;16L": Image.frombytes("I;16L", size, wide.astype("<u2").tobytes()),
        "I": Image.fromarray(wide.astype(np.int32)),
        "F": Image.fromarray((g / 255.0).astype(np.float32)),
    }


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I", "F"])
def test_high_bit_depth_is_scaled_not_clipped(tmp_path, mode, fmt):
    """A 16-bit (or 32-bit, or float) gradient decodes to the 8-bit gradient, within 1."""
    data = _writable(_wide_images()[mode], fmt)
    if data is None:
        pytest.skip(f"Pillow cannot write mode {mode} as {fmt}")
    stored_mode = Image.open(io.BytesIO(data)).mode
    assert stored_mode.startswith("I") or stored_mode == "F", stored_mode
    got = np.asarray(_decoded_through_a_shard(tmp_path, FORMATS[fmt], data), np.int16)
    expected = _gradient8().astype(np.int16)
    for c in range(3):
        assert np.abs(got[..., c] - expected).max() <= 1, (mode, fmt, got[0, ::32, c])


def test_high_bit_depth_photo_matches_its_8_bit_source():
    """``photos.to_mode(..., "I;16")`` spreads an 8-bit photo over 16 bits: decoding gives it back."""
    img = photo(9, (64, 48))
    data = encode(to_mode(img, "I;16"), "PNG")
    got = np.asarray(decode_image(data), np.int16)
    expected = np.asarray(img.convert("L"), np.int16)
    assert np.abs(got[..., 0] - expected).max() <= 1


@pytest.mark.parametrize(
    ("name", "array", "word"),
    [
        ("int-beyond-16-bit", np.full((8, 8), 1 << 20, np.int32), "0..65535"),
        ("negative-int", np.full((8, 8), -5, np.int32), "0..65535"),
        ("float-0-255", np.full((8, 8), 200.0, np.float32), "0..1"),
        ("float-nan", np.full((8, 8), np.nan, np.float32), "0..1"),
    ],
)
def test_modes_without_a_scale_are_refused_naming_shard_and_key(tmp_path, name, array, word):
    data = encode(Image.fromarray(array), "TIFF")
    url = _shard_of(tmp_path, {"good": ("png", encode(photo(1, (16, 16)), "PNG")), name: ("tif", data)})
    [shard] = load_shard_list(url)
    with pytest.raises(DataError) as info:
        list(iter_decoded(shard, 0, 1))
    msg = str(info.value)
    assert url in msg and repr(name) in msg and word in msg, msg
    assert [s.key for s in iter_decoded(shard, 0, 1, on_error="skip")] == ["good"]
