"""Building models with timm and running them on replayed pixels (a teacher's weights: :mod:`.teacher`).

Replayed pixels are un-normalised; :class:`Normalized` applies each model's own mean/std on the
model's device, so one pixel tensor serves a teacher and a student with different statistics.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import timm
import torch
from timm.models import clean_state_dict
from torch import nn

from pipeline.errors import CheckpointError, ConfigError
from pipeline.views.pixels import model_input
from pipeline.views.recipe import IMAGENET_MEAN, IMAGENET_STD, Recipe

log = logging.getLogger(__name__)


def read_state_dict(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read model weights from ``.safetensors``, a plain state dict, or a training checkpoint.

    Returns:
        The state dict (DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes removed, by timm's
        ``clean_state_dict``) and any metadata the file carries
        (our checkpoints store the model name and kwargs under ``"model_meta"``).
    """
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    meta: dict[str, Any] = {}
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict) and "model_meta" in obj:
                meta = dict(obj["model_meta"])
            if isinstance(obj, dict):
                for k in ("model", "state_dict", "model_ema", "state_dict_ema"):
                    if k in obj and isinstance(obj[k], dict):
                        obj = obj[k]
                        break
            sd = obj
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"checkpoint {path!r}: cannot read ({type(e).__name__}: {e})") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"checkpoint {path!r}: no state dict found")
    return clean_state_dict(sd), meta


def create(name: str, num_classes: int, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with one clear line for an unknown name or an argument the model does not take
    (e.g. ``--drop-path`` for a model without stochastic depth, such as a VGG)."""
    if not timm.is_model(name):
        raise ConfigError(f"model {name!r} is not a timm model")
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except TypeError as e:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if not unknown:
            raise
        arg = unknown.group(1)
        why = "it has no stochastic depth: pass --drop-path 0" if arg == "drop_path_rate" else "check the *-kwargs"
        raise ConfigError(f"timm model {name!r} takes no argument {arg!r}: {why}") from e


def load_strict(model: nn.Module, sd: dict[str, torch.Tensor], checkpoint: str, name: str) -> None:
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[:3]
        raise CheckpointError(f"checkpoint {checkpoint!r} does not fit model {name!r}: {' '.join(first)}") from e


def model_stats(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std the model was (pre)trained with, from timm's pretrained config."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(float(x) for x in cfg.get("mean", IMAGENET_MEAN))
    std = tuple(float(x) for x in cfg.get("std", IMAGENET_STD))
    return mean, std


def check_input_size(model: nn.Module, img_size: int, what: str) -> None:
    """Refuse, before any work, a model that cannot take ``img_size`` px views (e.g. a 224 px ViT given
    32 px views fails only at its first batch otherwise): one forward of a blank view in eval mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, img_size, img_size, dtype=torch.uint8))
    except Exception as e:  # timm raises AssertionError, RuntimeError... for a wrong size
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{what} cannot take {img_size} px views (the recipe's img_size): {first}") from e
    finally:
        model.train(was_training)


class Normalized(nn.Module):
    """Wrap a model so it takes compact replayed pixels (uint8 or float16, 0-1 scale) and normalises on device.

    Args:
        model: Any model taking normalised float32 images; ``self.net``.
        mean, std: Its input statistics; by default those of its timm ``pretrained_cfg`` (ImageNet's if it has none).
    """

    def __init__(self, model: nn.Module, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None):
        super().__init__()
        self.net = model
        stats = model_stats(model)
        mean, std = mean or stats[0], std or stats[1]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Compact replayed pixels (uint8 or float16) -> the model's normalised float32 input."""
        return (model_input(pixels) - self.mean) / self.std

    def forward(self, pixels: torch.Tensor) -> Any:
        return self.net(self.normalize(pixels))


def autocast(device: torch.device, enabled: bool = True) -> torch.autocast:
    """bf16 autocast on CUDA (as DeiT/timm train on GPUs); a no-op context on CPU."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def resolve_device(device: str) -> torch.device:
    """The torch device for ``--device``; under torchrun, CUDA rank r uses GPU ``LOCAL_RANK``."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA device")
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(device)


def build_student(
    name: str,
    num_classes: int,
    kwargs: dict[str, Any],
    *,
    drop_path: float,
    distilling: bool,
    recipe: Recipe,
    classes: Sequence[str] | None,
) -> tuple[Normalized, dict[str, Any]]:
    """A student wrapped with its normalisation, and the metadata ``evaluate`` rebuilds it from."""
    kwargs = dict(kwargs)
    if drop_path:
        kwargs.setdefault("drop_path_rate", drop_path)
    model = create(name, num_classes, **kwargs)
    if hasattr(model, "set_distilled_training"):
        # Both heads' logits in training; with --distillation none the distillation head gets no loss (DeiT).
        model.set_distilled_training(True)
    elif distilling:  # any timm classifier: docs/students-and-teachers.md
        log.info("%s has one head: it learns (1 - alpha) x the labels' loss + alpha x the teacher's", name)
    mean, std = model_stats(model)
    meta = {
        "name": name,
        "kwargs": {k: v for k, v in kwargs.items() if k != "drop_path_rate"},
        "crop_pct": recipe.crop_pct,
        "num_classes": num_classes,
        "img_size": recipe.img_size,
        "mean": list(mean),
        "std": list(std),
        "classes": list(classes) if classes else None,
    }
    return Normalized(model, mean, std), meta
