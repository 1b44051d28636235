"""Photo-like test images made on the fly, so the suite needs no image files from outside the repository.

Real photos matter to the tests for three properties, which these images have: every pixel is
textured (a pasted cutmix box differs from its surroundings everywhere), they have photo sizes and
aspect ratios (crops and resizes do real work), and they come in the modes and formats that real data
sets hold (RGB and grayscale JPEGs, CMYK JPEGs, palette and 16-bit PNGs, WebP). Everything is drawn
from a seeded ``numpy`` generator: the same arguments give the same bytes on any machine.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def photo(seed: int, size: tuple[int, int] = (96, 72), mode: str = "RGB") -> Image.Image:
    """A textured ``size`` (width, height) image: a colour gradient, a few shapes, grain, slight blur."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(30, 220, 3)
    slope = rng.uniform(-1.5, 1.5, (3, 2)) * 120 / max(w, h)
    img = np.stack([base[c] + slope[c, 0] * xx + slope[c, 1] * yy for c in range(3)], axis=-1)
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w - 4)), int(rng.integers(0, h - 4))
        x1, y1 = x0 + int(rng.integers(4, max(5, w // 2))), y0 + int(rng.integers(4, max(5, h // 2)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    grain = rng.normal(0, 18, (h, w, 3))
    arr = np.clip(np.asarray(canvas.filter(ImageFilter.GaussianBlur(0.6)), np.float32) + grain, 0, 255)
    rgb = Image.fromarray(arr.astype(np.uint8), "RGB")
    return to_mode(rgb, mode)


def to_mode(img: Image.Image, mode: str) -> Image.Image:
    """``img`` in ``mode``; ``I;16`` spreads the 8-bit range over 16 bits as a 16-bit scan would."""
    if mode == "I;16":
        wide = np.asarray(img.convert("L"), np.uint16) * 257
        return Image.fromarray(wide)  # uint16 -> I;16 (Pillow 13 no longer takes a mode here)
    if mode == "P":
        return img.convert("P", palette=Image.ADAPTIVE)
    return img.convert(mode)


def encode(img: Image.Image, fmt: str = "JPEG", **kw: object) -> bytes:
    """The bytes of ``img`` saved as ``fmt`` (``JPEG`` at quality 90 unless ``quality`` is given)."""
    buf = io.BytesIO()
    if fmt == "JPEG":
        kw = {"quality": 90, **kw}
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def jpeg(seed: int, size: tuple[int, int] = (96, 72), mode: str = "RGB") -> bytes:
    return encode(photo(seed, size, mode), "JPEG")


def write_synset_folder(root: Path, classes: int = 12, images: int = 40, gray_every: int = 8) -> list[str]:
    """A flat folder laid out like an ImageNet sample: ``classes.tsv`` (index, synset, name) and
    ``<synset>_<name>.JPEG`` files of photo sizes, every ``gray_every``-th one a grayscale JPEG.

    Returns:
        The synsets in class-index order.
    """
    root.mkdir(parents=True, exist_ok=True)
    synsets = [f"n{9000000 + 17 * i:08d}" for i in range(classes)]
    (root / "classes.tsv").write_text("".join(f"{i}\t{s}\tthing {i}\n" for i, s in enumerate(synsets)))
    for i in range(images):
        size = (80 + 7 * (i % 5), 60 + 5 * (i % 4))
        mode = "L" if i % gray_every == gray_every - 1 else "RGB"
        (root / f"{synsets[i % classes]}_item{i:03d}.JPEG").write_bytes(jpeg(1000 + i, size, mode))
    return synsets
