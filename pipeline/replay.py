"""View replay: image bytes + (seed, view, key) + recipe -> the exact augmented pixels.

Both phases call this module, so the teacher's cached logits and the student's inputs come from
one code path. Every random decision of a view is drawn from generators private to that view
(:mod:`pipeline.seeding`); nothing reads Python's, numpy's or torch's global RNG, so the result
does not depend on rank, worker, batch, epoch or shard order.

Pixels are returned un-normalised (float32, 0-1 range, CHW). Each model normalises them with its
own mean/std on its device; random-erasing noise is drawn in the recipe's normalised space and
mapped back, which is exactly equivalent after normalisation. Mixup and cutmix are affine with
weights summing to one, so they commute with normalisation too.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageEnhance
from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS, _RAND_TRANSFORMS, NAME_TO_OP
from torchvision.transforms import InterpolationMode

from .errors import ConfigError
from .recipe import RandAugmentSpec, Recipe
from .seeding import view_generators, window_rng

_INTERP = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}
_PIL_INTERP = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


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
    import numpy as np

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
class View:
    """One augmented view of one sample, with its ground-truth mix.

    ``label``/``mix_label``/``lam``: the ground-truth target is ``lam * onehot(label) +
    (1 - lam) * onehot(mix_label)`` (before label smoothing). Unmixed views have ``lam == 1``.
    """

    key: str
    shard_index: int
    position: int
    view: int
    pixels: torch.Tensor
    label: int
    mix_label: int
    lam: float


# ---------------------------------------------------------------------------------------------
# Per-sample transform


def _random_resized_crop_box(
    rng: random.Random, width: int, height: int, scale: Sequence[float], ratio: Sequence[float]
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params algorithm, drawing from ``rng``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            i = rng.randint(0, height - h)
            j = rng.randint(0, width - w)
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = round(w / min(ratio))
    elif in_ratio > max(ratio):
        h = height
        w = round(h * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _negate(rng: random.Random, v: float) -> float:
    return -v if rng.random() > 0.5 else v


def _rand_augment_args(name: str, level: float, rng: random.Random) -> tuple:
    """timm's level-to-argument table for the RandAugment ops, with signs drawn from ``rng``."""
    frac = level / 10.0
    if name in ("AutoContrast", "Equalize", "Invert"):
        return ()
    if name == "Rotate":
        return (_negate(rng, frac * 30.0),)
    if name in ("ShearX", "ShearY"):
        return (_negate(rng, frac * 0.3),)
    if name in ("TranslateXRel", "TranslateYRel"):
        return (_negate(rng, frac * 0.45),)
    if name.endswith("Increasing") and name[: -len("Increasing")] in ("Color", "Contrast", "Brightness", "Sharpness"):
        return (max(0.1, 1.0 + _negate(rng, frac * 0.9)),)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return (frac * 1.8 + 0.1,)
    if name == "PosterizeIncreasing":
        return (4 - int(frac * 4),)
    if name == "Posterize":
        return (int(frac * 4),)
    if name == "SolarizeIncreasing":
        return (256 - min(256, int(frac * 256)),)
    if name == "Solarize":
        return (min(256, int(frac * 256)),)
    if name == "SolarizeAdd":
        return (min(128, int(frac * 110)),)
    raise ConfigError(f"RandAugment op {name!r} is not supported by view replay")


def rand_augment(img: Image.Image, spec: RandAugmentSpec, recipe: Recipe, rng: random.Random) -> Image.Image:
    """timm's RandAugment (ops chosen with replacement, each applied with ``prob``)."""
    names = _RAND_INCREASING_TRANSFORMS if spec.increasing else _RAND_TRANSFORMS
    fill = tuple(round(255 * m) for m in recipe.mean)
    kwargs = {"fillcolor": fill, "resample": _PIL_INTERP[recipe.interpolation]}
    for _ in range(spec.num_layers):
        name = names[rng.randrange(len(names))]
        if spec.prob < 1.0 and rng.random() > spec.prob:
            continue
        magnitude = spec.magnitude
        if spec.magnitude_std > 0:
            magnitude = rng.gauss(magnitude, spec.magnitude_std)
        magnitude = max(0.0, min(magnitude, spec.magnitude_max))
        args = _rand_augment_args(name, magnitude, rng)
        if name.startswith("Posterize") and args[0] <= 0:
            # Keeping 0 bits is black; Pillow >= 11 refuses bits=0 where older Pillow returned black.
            img = Image.new(img.mode, img.size)
            continue
        img = NAME_TO_OP[name](img, *args, **kwargs)
    return img


def _color_jitter(img: Image.Image, strength: float, rng: random.Random) -> Image.Image:
    ops = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
    factors = [rng.uniform(max(0.0, 1 - strength), 1 + strength) for _ in ops]
    order = list(range(len(ops)))
    rng.shuffle(order)
    for k in order:
        img = ops[k](img).enhance(factors[k])
    return img


def _random_erase(x: torch.Tensor, recipe: Recipe, rng: random.Random, gen: torch.Generator) -> torch.Tensor:
    """timm RandomErasing (pixel mode, one box); noise is N(0,1) in the recipe's normalised space."""
    if rng.random() >= recipe.reprob:
        return x
    _, h_img, w_img = x.shape
    area = h_img * w_img
    log_ratio = (math.log(0.3), math.log(1 / 0.3))
    for _ in range(10):
        target_area = rng.uniform(0.02, 1 / 3) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        h = round(math.sqrt(target_area * aspect))
        w = round(math.sqrt(target_area / aspect))
        if w < w_img and h < h_img:
            top = rng.randint(0, h_img - h)
            left = rng.randint(0, w_img - w)
            noise = torch.randn((3, h, w), generator=gen)
            mean = torch.tensor(recipe.mean).view(3, 1, 1)
            std = torch.tensor(recipe.std).view(3, 1, 1)
            x = x.clone()
            x[:, top : top + h, left : left + w] = noise * std + mean
            return x
    return x


def to_pixels(img: Image.Image) -> torch.Tensor:
    return TF.pil_to_tensor(img).float().div_(255.0)


def eval_view(img: Image.Image, recipe: Recipe) -> torch.Tensor:
    """Resize the short side to ``img_size / crop_pct`` and center crop (timm/DeiT eval)."""
    resize = math.floor(recipe.img_size / recipe.crop_pct)
    img = TF.resize(img, resize, interpolation=_INTERP[recipe.interpolation])
    img = TF.center_crop(img, [recipe.img_size, recipe.img_size])
    return to_pixels(img)


def augment_view(img: Image.Image, recipe: Recipe, seed: int, view: int, key: str) -> torch.Tensor:
    """Produce the pixels of ``view`` of sample ``key`` (before mixing).

    The output depends on (image, recipe, seed, view, key) only.
    """
    if not recipe.is_random:
        return eval_view(img, recipe)
    rng, gen = view_generators(seed, view, key)
    i, j, h, w = _random_resized_crop_box(rng, img.width, img.height, recipe.scale, recipe.ratio)
    size = [recipe.img_size, recipe.img_size]
    img = TF.resized_crop(img, i, j, h, w, size, interpolation=_INTERP[recipe.interpolation])
    if rng.random() < recipe.hflip:
        img = TF.hflip(img)
    if recipe.auto_augment:
        img = rand_augment(img, RandAugmentSpec.parse(recipe.auto_augment), recipe, rng)
    elif recipe.color_jitter > 0:
        img = _color_jitter(img, recipe.color_jitter, rng)
    x = to_pixels(img)
    if recipe.reprob > 0:
        x = _random_erase(x, recipe, rng, gen)
    return x


# ---------------------------------------------------------------------------------------------
# Mixup / CutMix with in-shard partners


def _cutmix_box(lam: float, size: int, rng: random.Random) -> tuple[int, int, int, int, float]:
    """timm's rand_bbox + area-corrected lambda for a square image of side ``size``."""
    ratio = math.sqrt(1 - lam)
    cut = int(size * ratio)
    cy, cx = rng.randrange(size), rng.randrange(size)
    y0, y1 = max(cy - cut // 2, 0), min(cy + cut // 2, size)
    x0, x1 = max(cx - cut // 2, 0), min(cx + cut // 2, size)
    lam = 1.0 - (y1 - y0) * (x1 - x0) / float(size * size)
    return y0, y1, x0, x1, lam


def mix_window(views: list[View], recipe: Recipe, seed: int, shard_name: str, window: int) -> None:
    """Pair the views of one window and mix each pair in place.

    Partners are a permutation of the window's present positions, seeded by (seed, view, shard,
    window), so both phases rebuild the same pairs from the same shard. Both members of a pair
    share one lambda (and box); an unpaired last view stays unmixed.
    """
    if not views or not recipe.mixes:
        return
    rng = window_rng(seed, views[0].view, shard_name, window)
    order = list(range(len(views)))
    rng.shuffle(order)
    for a_idx, b_idx in zip(order[0::2], order[1::2], strict=False):
        a, b = views[a_idx], views[b_idx]
        if recipe.mixup_prob < 1.0 and rng.random() >= recipe.mixup_prob:
            continue
        use_cutmix = recipe.cutmix > 0 and (recipe.mixup <= 0 or rng.random() < recipe.mixup_switch_prob)
        if use_cutmix:
            lam = rng.betavariate(recipe.cutmix, recipe.cutmix)
            y0, y1, x0, x1, lam = _cutmix_box(lam, recipe.img_size, rng)
            pa, pb = a.pixels.clone(), b.pixels.clone()
            pa[:, y0:y1, x0:x1] = b.pixels[:, y0:y1, x0:x1]
            pb[:, y0:y1, x0:x1] = a.pixels[:, y0:y1, x0:x1]
        else:
            lam = rng.betavariate(recipe.mixup, recipe.mixup)
            pa = a.pixels * lam + b.pixels * (1 - lam)
            pb = b.pixels * lam + a.pixels * (1 - lam)
        a.pixels, b.pixels = pa, pb
        a.mix_label, a.lam = b.label, lam
        b.mix_label, b.lam = a.label, lam


# ---------------------------------------------------------------------------------------------
# Shard-level replay


@dataclass
class DecodedSample:
    """A sample of a shard after decoding: what view replay needs."""

    key: str
    shard_index: int
    position: int
    image: Image.Image
    label: int


def _windows(samples: Iterable[DecodedSample], size: int) -> Iterator[tuple[int, list[DecodedSample]]]:
    """Group consecutive samples by ``position // size``; a skipped sample leaves a gap."""
    current: list[DecodedSample] = []
    current_idx = -1
    for s in samples:
        idx = s.position // size
        if current and idx != current_idx:
            yield current_idx, current
            current = []
        current_idx = idx
        current.append(s)
    if current:
        yield current_idx, current


def replay_shard(
    samples: Iterable[DecodedSample],
    views: Sequence[int],
    recipe: Recipe,
    seed: int,
    shard_name: str,
) -> Iterator[list[View]]:
    """Yield, window by window and view by view, the final (mixed) views of a shard.

    Each image is decoded once (by the caller) and reused for every view in ``views``: this is
    how phase 1 decodes once per unit (shard x view block) and phase 2 reads one view per epoch.

    Yields:
        Lists of :class:`View` (one window, one view), in shard order.
    """
    window_size = recipe.mix_window if recipe.mixes else 1
    for window, members in _windows(samples, window_size):
        for v in views:
            out = [
                View(
                    key=s.key,
                    shard_index=s.shard_index,
                    position=s.position,
                    view=v,
                    pixels=augment_view(s.image, recipe, seed, v, s.key),
                    label=s.label,
                    mix_label=s.label,
                    lam=1.0,
                )
                for s in members
            ]
            mix_window(out, recipe, seed, shard_name, window)
            yield out
