"""Augmentation recipes: the full description of how a view is made from image bytes.

A recipe is plain data so that it can be stored in the cache's attributes, compared field by
field, and written into YAML configs. ``deit`` is DeiT's ImageNet training recipe; ``eval`` is the
deterministic resize + center crop used for validation and for no-randomness caches.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class RandAugmentSpec:
    """A timm RandAugment string, parsed as timm parses it (e.g. ``rand-m9-mstd0.5-inc1``).

    An omitted section takes timm's default, not DeiT's: magnitude 10, 2 ops, probability 0.5, no
    magnitude noise, the non-increasing op list, magnitude clipped to 10; ``mstd`` above 100 means a
    magnitude drawn uniformly from [0, m], as in timm. So ``rand-m9-n2`` means here what it means in timm.
    """

    magnitude: float = 10.0
    magnitude_std: float = 0.0
    num_layers: int = 2
    prob: float = 0.5
    increasing: bool = False
    magnitude_max: float = 10.0

    @classmethod
    def parse(cls, spec: str) -> RandAugmentSpec:
        """Parse the timm config string; unknown sections (e.g. timm's ``t`` op lists) are an error, not ignored."""
        parts = spec.split("-")
        if parts[0] != "rand":
            raise ConfigError(f"auto_augment {spec!r}: only RandAugment ('rand-...') is supported")
        values: dict[str, Any] = {}
        for part in parts[1:]:
            m = re.fullmatch(r"([a-z]+)([0-9.]+)", part)
            if not m:
                raise ConfigError(f"auto_augment {spec!r}: cannot parse section {part!r}")
            name, val = m.groups()
            if name == "m":
                values["magnitude"] = float(val)
            elif name == "mstd":
                values["magnitude_std"] = float("inf") if float(val) > 100 else float(val)
            elif name == "n":
                values["num_layers"] = int(val)
            elif name == "p":
                values["prob"] = float(val)
            elif name == "inc":
                values["increasing"] = bool(int(val))
            elif name == "mmax":
                values["magnitude_max"] = float(val)
            else:
                raise ConfigError(f"auto_augment {spec!r}: unknown section {part!r}")
        return cls(**values)


@dataclass(frozen=True)
class Recipe:
    """How one view of one sample is produced. Field defaults are DeiT's training recipe.

    Attributes:
        name: ``deit`` (random training views) or ``eval`` (resize + center crop, no randomness).
        img_size: Output side in pixels.
        scale, ratio: RandomResizedCrop area fraction and aspect ratio ranges.
        hflip: Horizontal flip probability.
        auto_augment: RandAugment string, or ``None`` to use colour jitter instead.
        color_jitter: Brightness/contrast/saturation strength when RandAugment is off.
        reprob: Random erasing probability (pixel mode: per-pixel normal noise).
        mixup, cutmix: Beta distribution alphas; 0 disables each.
        mixup_switch_prob: Probability of cutmix when both are on.
        mixup_prob: Probability that a pair is mixed at all.
        smoothing: Label smoothing for the ground-truth targets.
        repeats: R, the repeated-augmentation copies phase 2 trains per sample and epoch (DeiT: 3);
            mixing partners of view ``v`` are drawn within the group of the shard that is trained with
            ``v`` (:mod:`pipeline.views.plans`), so the cache is made for one ``R``.
        crop_pct: Center-crop fraction of the evaluation resize.
        mean, std: Normalisation of the recipe's pixel space (used by random-erasing noise).
    """

    name: str = "deit"
    img_size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.3
    reprob: float = 0.25
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_prob: float = 1.0
    smoothing: float = 0.1
    repeats: int = 1
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"

    @property
    def is_random(self) -> bool:
        return self.name != "eval"

    @property
    def mixes(self) -> bool:
        return self.is_random and self.mixup_prob > 0 and (self.mixup > 0 or self.cutmix > 0)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("scale", "ratio", "mean", "std"):
            d[k] = [float(x) for x in d[k]]
        return d


def _coerce_fields(d: dict[str, Any]) -> dict[str, Any]:
    """Check field names and turn YAML/JSON lists back into tuples."""
    known = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"recipe: unknown field(s) {unknown}; known: {sorted(known)}")
    d = dict(d)
    for k in ("scale", "ratio", "mean", "std"):
        if k in d:
            d[k] = tuple(float(x) for x in d[k])
    return d


def eval_recipe(img_size: int = 224, **overrides: Any) -> Recipe:
    """Evaluation transform: resize to ``img_size / crop_pct`` then center crop, no randomness."""
    return Recipe(
        name="eval",
        img_size=img_size,
        auto_augment=None,
        color_jitter=0.0,
        reprob=0.0,
        mixup=0.0,
        cutmix=0.0,
        mixup_prob=0.0,
        smoothing=0.0,
        hflip=0.0,
        **overrides,
    )


def make_recipe(spec: str | dict[str, Any] | Recipe, img_size: int | None = None, repeats: int | None = None) -> Recipe:
    """Build a recipe from a name (``deit``/``eval``), a dict of fields, or a recipe.

    ``img_size`` and ``repeats`` override those fields of whichever recipe results (e.g. DeiT's
    recipe at 32 px for tests and demos).
    """
    if isinstance(spec, Recipe):
        recipe = spec
    elif isinstance(spec, str):
        if spec == "deit":
            recipe = Recipe()
        elif spec == "eval":
            recipe = eval_recipe()
        else:
            raise ConfigError(f"recipe {spec!r}: expected 'deit', 'eval' or a mapping of fields")
    else:
        d = dict(spec)
        base = d.pop("name", "deit")
        recipe = dataclasses.replace(make_recipe(base), **_coerce_fields(d))
    if img_size is not None:
        recipe = dataclasses.replace(recipe, img_size=int(img_size))
    if repeats is not None:
        recipe = dataclasses.replace(recipe, repeats=int(repeats))
    if recipe.repeats < 1:
        raise ConfigError(f"recipe: repeats must be >= 1, got {recipe.repeats}")
    return recipe
