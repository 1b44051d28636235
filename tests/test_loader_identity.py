"""The loader's fast paths give exactly the pixels of the straightforward code they replaced (issue 21, loader).

Phase 1 cached the teacher's logits on views replayed by one version of this code; phase 2 trains on views
replayed by a later one. A speed-up that moves one pixel by one level silently pairs the student's input
with another image's targets (phase 2's pixel digests only sample 1 row in 16). So every optimised step is
compared here, on generated photos, with the plain version written as torchvision and timm spell it:

* each RandAugment op of timm's lists (both), at many magnitudes, both signs, both resamplings;
* a whole view (crop, flip, RandAugment or colour jitter, erasing box and noise) against the reference loop
  that interleaves timm's draws and ops, for RGB and grayscale sources;
* mixup of two views (uint8 or erased float32), against its two plain expressions;
* batches of compact views (uint8 and float16 side by side), in-process and inside a DataLoader worker,
  against ``torch.cat`` of :func:`pipeline.views.pixels.model_input` turned to float16; every uint8 value.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from photos import jpeg
from PIL import Image
from timm.data.auto_augment import NAME_TO_OP, rand_augment_choices
from torch.utils.data import DataLoader, IterableDataset
from torchvision.transforms import InterpolationMode

from pipeline.shards.decode import decode_image
from pipeline.views.augment import (
    _color_jitter,
    _erase_box,
    _rand_augment_args,
    _random_resized_crop_box,
    apply_op,
    augment,
    view_generators,
)
from pipeline.views.mixing import _mixup
from pipeline.views.pixels import _UINT8_TO_HALF, compact, model_input, stack_views
from pipeline.views.recipe import RandAugmentSpec, Recipe

pytestmark = pytest.mark.usefixtures("one_thread")

OPS = sorted(set(rand_augment_choices("", increasing=True)) | set(rand_augment_choices("", increasing=False)))
INTERP = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}
PIL_INTERP = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """Decoded photo-like JPEGs of photo sizes, one of them grayscale (decoded to RGB like any sample)."""
    sizes = [(160, 120), (120, 160), (200, 133), (97, 61)]
    out = [decode_image(jpeg(40 + i, size)) for i, size in enumerate(sizes)]
    return [*out, decode_image(jpeg(50, (150, 100), "L"))]


def reference_op(img: Image.Image, name: str, args: tuple, recipe: Recipe) -> Image.Image:
    """timm's op as its ``AugmentOp`` calls it."""
    if name.startswith("Posterize") and args[0] <= 0:
        return Image.new(img.mode, img.size)
    fill = tuple(round(255 * m) for m in recipe.mean)
    return NAME_TO_OP[name](img, *args, fillcolor=fill, resample=PIL_INTERP[recipe.interpolation])


def reference_augment(img: Image.Image, recipe: Recipe, seed: int, view: int, key: str) -> tuple:
    """The view as the first version of ``augment`` made it: torchvision's crop/resize/flip/to-tensor, timm's ops
    with their draws interleaved. Returns the uint8 pixels, the erasing box and the noise generator."""
    rng, gen = view_generators(seed, view, key)
    i, j, h, w = _reference_crop_box(rng, img, recipe)
    size = [recipe.img_size, recipe.img_size]
    img = TF.resized_crop(img, i, j, h, w, size, interpolation=INTERP[recipe.interpolation])
    if rng.random() < recipe.hflip:
        img = TF.hflip(img)
    if recipe.auto_augment:
        spec = RandAugmentSpec.parse(recipe.auto_augment)
        names = rand_augment_choices("", increasing=spec.increasing)
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
            img = reference_op(img, name, _rand_augment_args(name, magnitude, rng), recipe)
    elif recipe.color_jitter > 0:
        img = _color_jitter(img, recipe.color_jitter, rng)
    x = TF.pil_to_tensor(img)
    box = _erase_box(tuple(x.shape), recipe, rng) if recipe.reprob > 0 else None
    return x, box, gen if box else None


def _reference_crop_box(rng: random.Random, img: Image.Image, recipe: Recipe) -> tuple[int, int, int, int]:
    return _random_resized_crop_box(rng, img.width, img.height, recipe.scale, recipe.ratio)


def _op_args(name: str) -> list[tuple]:
    """Arguments across the op's range: levels 0..10 in steps of 0.7 (and 9 +- noise), signs from a seeded rng."""
    rng = random.Random(name)
    levels = [k * 0.7 for k in range(15)] + [9.0 + rng.gauss(0, 0.5) for _ in range(6)]
    return [_rand_augment_args(name, max(0.0, min(level, 10.0)), rng) for level in levels]


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("name", OPS)
def test_each_rand_augment_op_gives_timms_pixels(images, name, interpolation):
    recipe = Recipe(interpolation=interpolation)
    for img in images:
        square = img.resize((64, 64), Image.BICUBIC)
        for args in _op_args(name):
            for src in (square, img):  # square as in a view, and a photo's own aspect ratio
                got, want = apply_op(src, name, args, recipe), reference_op(src, name, args, recipe)
                assert got.mode == want.mode and got.size == want.size, (name, args)
                assert np.array_equal(np.asarray(got), np.asarray(want)), (name, args, src.size)


RECIPES = {
    "deit": Recipe(img_size=64),
    "deit-bilinear-uniform-n3": Recipe(img_size=48, interpolation="bilinear", auto_augment="rand-m7-n3-mstd101-p0.8"),
    "jitter": Recipe(img_size=40, auto_augment=None, reprob=0.5),
    "every-op-every-time": Recipe(img_size=56, auto_augment="rand-m9-n4-mstd0.5-inc1-p1.0", reprob=1.0),
}


@pytest.mark.parametrize("recipe", RECIPES.values(), ids=RECIPES.keys())
def test_a_whole_view_equals_the_reference_loop(images, recipe):
    for k, img in enumerate(images):
        for view in range(12):
            key = f"photo{k}"
            got = augment(img, recipe, 7, view, key)
            pixels, box, gen = reference_augment(img, recipe, 7, view, key)
            assert torch.equal(got.pixels, pixels) and got.erase == box, (key, view)
            assert torch.equal(got.erased(recipe), reference_erased(pixels, box, gen, recipe)), (key, view)


def reference_erased(pixels: torch.Tensor, box: tuple | None, gen: torch.Generator | None, recipe: Recipe):
    """timm's RandomErasing fill (pixel mode) in the recipe's normalised space, mapped back to [0, 1]."""
    if box is None:
        return pixels
    top, left, h, w = box
    x = pixels.float().div_(255.0)
    noise = torch.randn((3, h, w), generator=gen)
    mean, std = torch.tensor(recipe.mean).view(3, 1, 1), torch.tensor(recipe.std).view(3, 1, 1)
    x[:, top : top + h, left : left + w] = noise * std + mean
    return x


def _views(n: int, seed: int = 0) -> list[torch.Tensor]:
    """Compact views as replay makes them: uint8 in HWC memory (a permuted view), and float16."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        u = torch.randint(0, 256, (24, 20, 3), dtype=torch.uint8, generator=g).permute(2, 0, 1)
        out.append(u if i % 3 else (u.float() / 255 + torch.rand(u.shape, generator=g) / 64).half())
    return out


def reference_stack(views: list[torch.Tensor]) -> torch.Tensor:
    if all(v.dtype == torch.uint8 for v in views):
        return torch.cat([v[None] for v in views])
    return torch.cat([model_input(v[None]).to(torch.float16) if v.dtype == torch.uint8 else v[None] for v in views])


def test_every_uint8_value_becomes_the_tables_float16():
    every = torch.arange(256, dtype=torch.uint8).repeat(3 * 224 * 224 // 256 + 7)  # vector and scalar tails
    got = stack_views([every.view(1, 1, -1), torch.zeros(1, 1, every.numel(), dtype=torch.float16)])[0]
    assert torch.equal(got.view(-1), _UINT8_TO_HALF[every.long()])


@pytest.mark.parametrize("n", [1, 2, 7])
def test_batches_equal_the_straightforward_join(n):
    views = _views(n)
    for part in (views, [v for v in views if v.dtype == torch.uint8] or views, views[::-1]):
        got, want = stack_views(part), reference_stack(part)
        assert got.dtype == want.dtype and torch.equal(got, want)


class _Stacks(IterableDataset):
    def __iter__(self):
        for seed in range(3):
            batch = stack_views(_views(5, seed))
            yield batch, batch.is_shared()


def test_a_workers_batches_are_in_shared_memory_and_unchanged():
    got = list(DataLoader(_Stacks(), batch_size=None, num_workers=1))
    for seed, (batch, shared) in enumerate(got):
        assert shared, "made in shared memory, so sending it copies nothing"
        assert torch.equal(batch, reference_stack(_views(5, seed)))


def test_mixup_equals_the_plain_expressions_and_leaves_its_inputs_alone():
    g = torch.Generator().manual_seed(3)
    u = [torch.randint(0, 256, (30, 26, 3), dtype=torch.uint8, generator=g).permute(2, 0, 1) for _ in range(2)]
    f = [x.float().div(255.0) + torch.rand(x.shape, generator=g) / 8 for x in u]  # erased views are float32
    for a, b in [(u[0], u[1]), (u[0], f[1]), (f[0], u[1]), (f[0], f[1])]:
        before = (a.clone(), b.clone())
        fa, fb = (x.float() / 255.0 if x.dtype == torch.uint8 else x for x in (a, b))
        for lam in (0.0, 1e-7, 0.3719, 0.5, 0.999, 1.0):
            ma, mb = _mixup(a, b, lam)
            assert torch.equal(ma, fa * lam + fb * (1 - lam)) and torch.equal(mb, fb * lam + fa * (1 - lam))
            assert torch.equal(compact(ma), compact(fa * lam + fb * (1 - lam)))
        assert torch.equal(a, before[0]) and torch.equal(b, before[1])
