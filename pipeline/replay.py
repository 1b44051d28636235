"""View replay: image bytes + (seed, view, key) + recipe -> the exact augmented pixels.

Both phases call this module, so the teacher's cached logits and the student's inputs come from
one code path. Every random decision of a view is drawn from generators private to that view
(:mod:`pipeline.seeding`); nothing reads Python's, numpy's or torch's global RNG, so the result
does not depend on rank, worker, batch, epoch or shard order.

A view's pixels are compact (:func:`compact`): uint8 CHW while they are whole numbers (no random
erasing, no mixup), else float16; the model sees ``float32(float16(x))`` either way
(:func:`model_input`), whatever else is in its batch, so the teacher in phase 1 and the student in
phase 2 get the same numbers. Each model normalises them with its own mean/std on its device;
random-erasing noise is drawn in the recipe's normalised space and mapped back, which is exactly
equivalent after normalisation. Mixup and cutmix are affine with weights summing to one, so they
commute with normalisation too. Random erasing is decided with the view but applied only when the
view is finished, so a shard's views wait as uint8.
"""

from __future__ import annotations

import io
import math
import random
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageEnhance
from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS, _RAND_TRANSFORMS, NAME_TO_OP
from torchvision.transforms import InterpolationMode

from .errors import ConfigError
from .mixing import mix_pair, partners
from .recipe import RandAugmentSpec, Recipe
from .seeding import view_generators

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

    ``pixels``: compact CHW (uint8 or float16, see :func:`compact`). ``label``/``mix_label``/``lam``:
    the ground-truth target is ``lam * onehot(label) + (1 - lam) * onehot(mix_label)`` (before label
    smoothing). Unmixed views have ``lam == 1``.
    """

    key: str
    shard_index: int
    position: int
    view: int
    pixels: torch.Tensor
    label: int
    mix_label: int
    lam: float
    digest: int = 0


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


def _erase_box(shape: tuple[int, ...], recipe: Recipe, rng: random.Random) -> tuple[int, int, int, int] | None:
    """timm RandomErasing's decision and box (pixel mode, one box): ``(top, left, h, w)`` or ``None``."""
    if rng.random() >= recipe.reprob:
        return None
    _, h_img, w_img = shape
    area = h_img * w_img
    log_ratio = (math.log(0.3), math.log(1 / 0.3))
    for _ in range(10):
        target_area = rng.uniform(0.02, 1 / 3) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        h = round(math.sqrt(target_area * aspect))
        w = round(math.sqrt(target_area / aspect))
        if w < w_img and h < h_img:
            return rng.randint(0, h_img - h), rng.randint(0, w_img - w), h, w
    return None


@dataclass
class Augmented:
    """A sample's view before mixing: uint8 pixels and the erasing box drawn for it, not yet applied."""

    pixels: torch.Tensor
    erase: tuple[int, int, int, int] | None = None
    noise: torch.Generator | None = None

    def finish(self, recipe: Recipe) -> torch.Tensor:
        """The pixels with the erasing box filled: uint8 when nothing is erased, else float32 in [0, 1] space.

        The box's noise is N(0, 1) in the recipe's normalised space, drawn from the view's own generator.
        """
        if self.erase is None:
            return self.pixels
        top, left, h, w = self.erase
        x = self.pixels.float().div_(255.0)
        noise = torch.randn((3, h, w), generator=self.noise)
        mean = torch.tensor(recipe.mean).view(3, 1, 1)
        std = torch.tensor(recipe.std).view(3, 1, 1)
        x[:, top : top + h, left : left + w] = noise * std + mean
        return x


def compact(x: torch.Tensor) -> torch.Tensor:
    """A finished view as it travels and is stored: uint8 stays uint8, anything else becomes float16."""
    return x if x.dtype == torch.uint8 else x.to(torch.float16)


# float16(k / 255) for every uint8 k, computed once on the CPU: a table lookup gives the same numbers on
# any device, where a division on an accelerator might round differently.
_UINT8_TO_HALF = (torch.arange(256, dtype=torch.float32) / 255.0).to(torch.float16)


def model_input(pixels: torch.Tensor) -> torch.Tensor:
    """float32 model input from compact pixels (a view or a batch): ``float32(float16(x))`` for both kinds.

    uint8 value ``k`` becomes ``float16(k / 255)``, exactly as :func:`stack` turns a uint8 view that
    shares a batch with float16 views, so a view's input does not depend on its batch or its device.
    """
    if pixels.dtype == torch.uint8:
        pixels = _UINT8_TO_HALF.to(pixels.device)[pixels.long()]
    return pixels.float()


def concat(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Join batches of compact pixels: uint8 if every part is uint8 (1 byte per value), else float16
    (2 bytes), a uint8 part turned into exactly the float16 :func:`model_input` would give it."""
    if all(p.dtype == torch.uint8 for p in parts):
        return torch.cat(list(parts))
    return torch.cat([model_input(p).to(torch.float16) if p.dtype == torch.uint8 else p for p in parts])


def stack(views: Sequence[torch.Tensor]) -> torch.Tensor:
    """One batch tensor from compact views (see :func:`concat`)."""
    return concat([v[None] for v in views])


def eval_view(img: Image.Image, recipe: Recipe) -> torch.Tensor:
    """Resize the short side to ``img_size / crop_pct`` and center crop (timm/DeiT eval); uint8 CHW."""
    resize = math.floor(recipe.img_size / recipe.crop_pct)
    img = TF.resize(img, resize, interpolation=_INTERP[recipe.interpolation])
    img = TF.center_crop(img, [recipe.img_size, recipe.img_size])
    return TF.pil_to_tensor(img)


def augment(img: Image.Image, recipe: Recipe, seed: int, view: int, key: str) -> Augmented:
    """The per-sample part of ``view`` of sample ``key``: crop, flip, RandAugment or jitter, erasing box.

    The output depends on (image, recipe, seed, view, key) only.
    """
    if not recipe.is_random:
        return Augmented(eval_view(img, recipe))
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
    x = TF.pil_to_tensor(img)
    box = _erase_box(tuple(x.shape), recipe, rng) if recipe.reprob > 0 else None
    return Augmented(x, box, gen if box else None)


def augment_view(img: Image.Image, recipe: Recipe, seed: int, view: int, key: str) -> torch.Tensor:
    """The unmixed view as the model sees it (float32), for tools and tests."""
    return model_input(compact(augment(img, recipe, seed, view, key).finish(recipe)))


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
    digest: int = 0  # a hash of the stored image bytes (pipeline.shards.image_digest); 0 = unknown


def _view(s: DecodedSample, view: int, pixels: torch.Tensor, mix_label: int, lam: float) -> View:
    return View(s.key, s.shard_index, s.position, view, compact(pixels), s.label, mix_label, lam, s.digest)


def mixed_views(
    samples: Sequence[DecodedSample], view: int, recipe: Recipe, seed: int, shard: str, count: int
) -> Iterator[View]:
    """The finished ``view`` of each of ``samples`` (a whole shard, or the repeated-augmentation group an
    epoch trains), mixed with its partner among them (:func:`pipeline.mixing.partners`).

    Each sample is augmented once; views come out pair by pair, not in position order.
    """
    by_position = {s.position: s for s in samples}
    pairs = (
        partners(seed, view, shard, count, recipe.repeats, by_position)
        if recipe.mixes
        else [(p, None) for p in by_position]
    )
    for pa, pb in pairs:
        a = by_position[pa]
        xa = augment(a.image, recipe, seed, view, a.key).finish(recipe)
        if pb is None:
            yield _view(a, view, xa, a.label, 1.0)
            continue
        b = by_position[pb]
        xb = augment(b.image, recipe, seed, view, b.key).finish(recipe)
        mixed = mix_pair(xa, xb, recipe, seed, view, shard, (pa, pb))
        if mixed is None:
            yield _view(a, view, xa, a.label, 1.0)
            yield _view(b, view, xb, b.label, 1.0)
        else:
            ma, mb, lam = mixed
            yield _view(a, view, ma, b.label, lam)
            yield _view(b, view, mb, a.label, lam)


def replay_shard(
    samples: Iterable[DecodedSample], views: Sequence[int], recipe: Recipe, seed: int, shard: str, count: int
) -> Iterator[View]:
    """Every finished view in ``views`` of every sample of a shard (phase 1's unit, ``verify-cache``).

    Each image is decoded once (by the caller) and reused for every view: with mixing the whole shard
    is held decoded (partners come from all of it); without, samples stream through one at a time.
    """
    if not recipe.mixes:
        for s in samples:
            for v in views:
                yield from mixed_views([s], v, recipe, seed, shard, count)
        return
    held = list(samples)
    for v in views:
        yield from mixed_views(held, v, recipe, seed, shard, count)


def replay_copies(
    samples: Iterable[DecodedSample], views: Sequence[int], recipe: Recipe, seed: int, shard: str, count: int
) -> Iterator[list[View]]:
    """Phase 2: the copies of each sample an epoch trains, one per view of ``views``, sample by sample.

    ``samples`` are the epoch's repeated-augmentation group of the shard (the whole shard without
    repeats), so every partner is among them.
    """
    if not recipe.mixes:  # no partners: one sample at a time
        for s in samples:
            yield [x for v in views for x in mixed_views([s], v, recipe, seed, shard, count)]
        return
    held = list(samples)
    if len(views) == 1:  # one copy each: no need to hold finished views
        for x in mixed_views(held, views[0], recipe, seed, shard, count):
            yield [x]
        return
    copies: dict[int, list[View]] = defaultdict(list)
    for v in views:
        for x in mixed_views(held, v, recipe, seed, shard, count):
            copies[x.position].append(x)
    for s in held:
        yield copies[s.position]
