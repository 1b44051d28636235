"""The per-sample part of a view: crop, flip, RandAugment or colour jitter, and the erasing box.

Every random decision of view ``v`` of sample ``key`` is drawn from generators private to that view,
seeded by ``(seed, v, key)`` (:func:`view_generators`); nothing reads Python's, numpy's or torch's
global RNG, so the result does not depend on rank, worker, batch, epoch or shard order. Each model
normalises the pixels with its own mean/std on its device; random-erasing noise is drawn in the
recipe's normalised space and mapped back, which is exactly equivalent after normalisation. Random
erasing is decided with the view but applied only when the view is mixed (:meth:`Augmented.erased`),
so a shard's views wait as uint8. The RandAugment ops, their level tables and op lists are timm's.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageEnhance
from timm.data.auto_augment import NAME_TO_OP, rand_augment_choices
from torchvision.transforms import InterpolationMode

from pipeline.errors import ConfigError
from pipeline.seeding import stable_seed
from pipeline.views.pixels import compact, model_input
from pipeline.views.recipe import RandAugmentSpec, Recipe

_INTERP = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}
_PIL_INTERP = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


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


@functools.cache
def _rand_augment_setup(auto_augment: str) -> tuple[RandAugmentSpec, tuple[str, ...]]:
    """The parsed spec and timm's op list, once per process rather than once per view."""
    spec = RandAugmentSpec.parse(auto_augment)
    return spec, tuple(rand_augment_choices("", increasing=spec.increasing))


def rand_augment_ops(spec: RandAugmentSpec, names: Sequence[str], rng: random.Random) -> list[tuple[str, tuple]]:
    """The ops one view's RandAugment applies, with their arguments, in timm's order of draws.

    No op draws from ``rng`` while it runs, so drawing every choice first and applying the ops after
    (:func:`apply_op`) consumes ``rng`` exactly as timm's interleaved loop does; the profile in
    ``bench/loader_speed.py`` times each op on its own through this split.
    """
    ops = []
    for _ in range(spec.num_layers):
        name = names[rng.randrange(len(names))]
        if spec.prob < 1.0 and rng.random() > spec.prob:
            continue
        magnitude = spec.magnitude
        if spec.magnitude_std == float("inf"):
            magnitude = rng.uniform(0, magnitude)
        elif spec.magnitude_std > 0:
            magnitude = rng.gauss(magnitude, spec.magnitude_std)
        magnitude = max(0.0, min(magnitude, spec.magnitude_max))
        ops.append((name, _rand_augment_args(name, magnitude, rng)))
    return ops


def apply_op(img: Image.Image, name: str, args: tuple, recipe: Recipe) -> Image.Image:
    """One RandAugment op as timm applies it (fill: the recipe's mean colour; the recipe's resampling)."""
    if name.startswith("Posterize") and args[0] <= 0:
        # Keeping 0 bits is black; Pillow >= 11 refuses bits=0 where older Pillow returned black.
        return Image.new(img.mode, img.size)
    return NAME_TO_OP[name](img, *args, fillcolor=_fill(recipe.mean), resample=_PIL_INTERP[recipe.interpolation])


@functools.cache
def _fill(mean: tuple[float, ...]) -> tuple[int, ...]:
    return tuple(round(255 * m) for m in mean)


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

    def erased(self, recipe: Recipe) -> torch.Tensor:
        """The pixels with the erasing box filled: uint8 when nothing is erased, else float32 in [0, 1] space.

        The box's noise is N(0, 1) in the recipe's normalised space, drawn from the view's own generator.
        """
        if self.erase is None:
            return self.pixels
        top, left, h, w = self.erase
        x = self.pixels.float().div_(255.0)
        noise = torch.randn((3, h, w), generator=self.noise)
        x[:, top : top + h, left : left + w] = noise.mul_(_per_channel(recipe.std)).add_(_per_channel(recipe.mean))
        return x


@functools.cache
def _per_channel(values: tuple[float, ...]) -> torch.Tensor:
    """A recipe's mean or std as a (C, 1, 1) float32 tensor, made once per process (never written to)."""
    return torch.tensor(values).view(-1, 1, 1)


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
    img = random_resized_crop(img, recipe, rng)
    if rng.random() < recipe.hflip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if recipe.auto_augment:
        spec, names = _rand_augment_setup(recipe.auto_augment)
        for name, args in rand_augment_ops(spec, names, rng):
            img = apply_op(img, name, args, recipe)
    elif recipe.color_jitter > 0:
        img = _color_jitter(img, recipe.color_jitter, rng)
    x = to_tensor(img)
    box = _erase_box(tuple(x.shape), recipe, rng) if recipe.reprob > 0 else None
    return Augmented(x, box, gen if box else None)


def random_resized_crop(img: Image.Image, recipe: Recipe, rng: random.Random) -> Image.Image:
    """timm's RandomResizedCropAndInterpolation: the crop box drawn from ``rng``, then PIL's crop and resize.

    The same two PIL calls torchvision's ``resized_crop`` makes, without its dispatch; not ``resize(box=...)``,
    whose filter reaches pixels outside the box and so changes the edges of the view.
    """
    i, j, h, w = _random_resized_crop_box(rng, img.width, img.height, recipe.scale, recipe.ratio)
    return img.crop((j, i, j + w, i + h)).resize((recipe.img_size, recipe.img_size), _PIL_INTERP[recipe.interpolation])


def to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 CHW pixels of an RGB image (HWC memory, as torchvision's ``pil_to_tensor`` gives them)."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def augment_view(img: Image.Image, recipe: Recipe, seed: int, view: int, key: str) -> torch.Tensor:
    """The unmixed view as the model sees it (float32), for tools and tests."""
    return model_input(compact(augment(img, recipe, seed, view, key).erased(recipe)))
