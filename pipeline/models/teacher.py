"""A teacher: its weights and their identity (a checkpoint file, or timm's pretrained weights found by
name), and the frozen model both phases and ``verify-cache`` run.

A cache records the SHA-256 of the very file its teacher's weights were read from, so that phase 2's live
teacher and ``verify-cache`` can prove they run the same teacher. For ``--teacher NAME --teacher-pretrained``
that file is found the way ``timm.create_model(NAME, pretrained=True)`` finds it (timm's pretrained config,
then the Hugging Face hub's local cache or a download, or torch hub's cache for plain URLs), through
timm's and huggingface_hub's own functions, so ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE``, ``HF_HOME`` and
``TORCH_HOME`` mean what they mean to timm. timm is then handed that file (its ``pretrained_cfg_overlay``
``file``), so the weights hashed are exactly the weights loaded, and a fetch that cannot happen (no
network, nothing cached) is one :class:`CheckpointError` line saying what to do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import timm
import torch
from torch import nn

from pipeline import storage
from pipeline.errors import CheckpointError, ConfigError
from pipeline.models.build import Normalized, create, load_strict, model_stats, read_state_dict

_HF_ALTERNATIVES_OF = "pytorch_model.bin"  # timm's default hub file name, tried after its safetensors twin


@dataclass(frozen=True)
class TeacherWeights:
    """Where a teacher's weights are read from, and what a cache records of them.

    Attributes:
        path: The local file the weights are read from.
        pretrained: timm's ``architecture.tag`` of pretrained weights (None for a ``--teacher-checkpoint``).
        num_classes: The classes the pretrained weights classify (None when unknown or for a checkpoint).
        custom_load: timm's ``custom_load`` of the weights' format (a non-native file, e.g. ``.npz``).
    """

    path: str
    pretrained: str | None = None
    num_classes: int | None = None
    custom_load: bool = False
    where: str = field(default="", compare=False)  # where timm's resolution found them, for messages

    @cached_property
    def sha256(self) -> str:
        """SHA-256 of the file's bytes, computed once."""
        return storage.sha256_file(self.path)

    def identity(self) -> dict[str, Any]:
        """The teacher-identity fields a cache records: the digest, and for timm's weights their name.tag."""
        out: dict[str, Any] = {"checkpoint_sha256": self.sha256}
        if self.pretrained:
            out["pretrained"] = self.pretrained
        return out

    def describe(self) -> str:
        """How a message names these weights."""
        if self.pretrained:
            return f"timm's pretrained weights {self.pretrained} ({self.path})"
        return f"checkpoint {self.path!r}"


def teacher_weights(
    name: str, checkpoint: str | None, pretrained: bool, kwargs: dict[str, Any] | None = None
) -> TeacherWeights:
    """The weights a teacher is built with: ``checkpoint`` when given, else timm's pretrained ones."""
    if checkpoint:
        return TeacherWeights(checkpoint)
    if pretrained:
        return resolve_pretrained(name, kwargs or {})
    raise ConfigError(f"teacher {name!r} needs --teacher-checkpoint FILE or --teacher-pretrained")


def load_teacher(
    name: str,
    num_classes: int,
    weights: str | TeacherWeights,
    device: torch.device,
    kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The frozen teacher as both phases run it (cache-teacher, train-student's live mode, verify-cache).

    ``weights`` is a checkpoint path or :class:`~pipeline.models.teacher.TeacherWeights` (a checkpoint, or
    timm's pretrained weights by name). A checkpoint is read once: its weights, and the model name and
    kwargs our own checkpoints carry (``kwargs`` override those). Pretrained weights are loaded by timm
    itself from the very file whose digest is recorded. The model is wrapped with its own normalisation,
    in eval mode without gradients, and channels_last on CUDA.

    Returns:
        The model and ``{"checkpoint_sha256", ["pretrained"], "kwargs", "mean", "std"}`` it was built with
        (part of a cache's identity).
    """
    weights = weights if isinstance(weights, TeacherWeights) else TeacherWeights(weights)
    kwargs = dict(kwargs or {})
    if weights.pretrained:
        if weights.num_classes and weights.num_classes != num_classes:
            raise ConfigError(
                f"{weights.describe()} classify {weights.num_classes} classes, but the data has {num_classes}: "
                f"pass --num-classes {weights.num_classes} if the labels are theirs, or use a teacher trained "
                f"for these {num_classes} classes (--teacher-checkpoint)"
            )
        model = create(name, num_classes, pretrained=True, **create_kwargs(weights, kwargs))
    else:
        sd, meta = read_state_dict(weights.path)
        if meta.get("name") and meta["name"] != name:
            raise CheckpointError(f"--teacher {name!r} but {weights.path!r} holds a {meta['name']!r}")
        kwargs = {**meta.get("kwargs", {}), **kwargs}
        model = create(name, num_classes, **kwargs)
        load_strict(model, sd, weights.path, name)
    mean, std = model_stats(model)
    wrapped = Normalized(model, mean, std).eval().requires_grad_(False).to(device)
    if device.type == "cuda":
        wrapped = wrapped.to(memory_format=torch.channels_last)
    return wrapped, {**weights.identity(), "kwargs": kwargs, "mean": list(mean), "std": list(std)}


def checkpoint_num_classes(name: str, checkpoint: str | None, pretrained: bool = False) -> int | None:
    """The class count a teacher's weights were trained for: its classifier's output size.

    timm names each model's classifier in its pretrained config (``head.fc`` for RegNets, ``fc`` for
    ResNets, ``("head", "head_dist")`` for distilled DeiTs): the rows of ``<classifier>.weight`` in the
    checkpoint are the classes. Without a checkpoint, timm's pretrained weights have the config's
    ``num_classes``. None when the model or checkpoint does not say.
    """
    if not timm.is_model(name):
        raise ConfigError(f"model {name!r} is not a timm model")
    cfg = pretrained_cfg(name)
    if checkpoint is None:
        return int(cfg.num_classes) if pretrained and cfg and cfg.num_classes else None
    heads = cfg.classifier if cfg else None
    heads = [heads] if isinstance(heads, str) else list(heads or [])
    sd, meta = read_state_dict(checkpoint)
    if meta.get("num_classes"):
        return int(meta["num_classes"])
    for head in heads:
        weight = sd.get(f"{head}.weight")
        if weight is not None and weight.ndim >= 1:
            return int(weight.shape[0])
    return None


def pretrained_cfg(name: str, tag: str | None = None, overlay: dict[str, Any] | None = None) -> Any:
    """timm's pretrained config of ``name`` (``architecture.tag``, or ``tag`` given apart); a tag timm does not
    know for that architecture is refused naming the tags it knows."""
    arch, own = timm.models.split_model_name_tag(name)
    tag = tag or own or None
    try:
        if overlay is None and tag is None:
            return timm.models.get_pretrained_cfg(name)
        return timm.models.resolve_pretrained_cfg(arch, tag, overlay)
    except RuntimeError:  # timm: "Invalid pretrained tag (...) for ..."
        known = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{arch}.*")]
        raise ConfigError(
            f"--teacher {name}: timm has no pretrained weights tagged {tag!r} for {arch} (its tags: "
            f"{', '.join(known) or 'none'})"
        ) from None


def create_kwargs(weights: TeacherWeights, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``timm.create_model`` arguments that make ``pretrained=True`` read exactly ``weights.path``."""
    overlay = {**(kwargs.get("pretrained_cfg_overlay") or {})}
    overlay.update(file=weights.path, source=None, custom_load=weights.custom_load)
    return {**kwargs, "pretrained_cfg_overlay": overlay}


def resolve_pretrained(name: str, kwargs: dict[str, Any]) -> TeacherWeights:
    """The local file timm's ``pretrained=True`` loads for ``name`` (fetched into timm's caches if needed).

    Raises:
        ConfigError: ``name`` is not a timm model, or timm knows no pretrained weights for it.
        CheckpointError: the weights cannot be fetched (offline, no network, gated...), in one line.
    """
    from timm.models._builder import _resolve_pretrained_source  # timm's own choice of source

    arch, tag = timm.models.split_model_name_tag(name)
    if not timm.is_model(arch):
        raise ConfigError(f"model {name!r} is not a timm model")
    cfg_arg = kwargs.get("pretrained_cfg") or tag or None
    cfg = pretrained_cfg(name, cfg_arg, kwargs.get("pretrained_cfg_overlay") or {}).to_dict()
    full = f"{cfg.get('architecture') or arch}.{cfg['tag']}" if cfg.get("tag") else name
    custom = cfg.get("custom_load") or False
    if isinstance(custom, str):  # a model-specific loader reading several hub files: no one file to hash
        raise ConfigError(
            f"timm loads the pretrained weights of {full!r} with a model-specific loader ({custom!r}); save them "
            "as a state dict on a machine that has them and pass --teacher-checkpoint FILE"
        )
    source, location = _resolve_pretrained_source(cfg)
    if source == "file":
        if not os.path.exists(location):
            raise CheckpointError(f"pretrained weights file {location!r} of {full!r} does not exist")
        path, where = str(location), f"file {location}"
    elif source == "hf-hub":
        path, where = _hub_file(full, location)
    elif source == "url":
        path, where = _url_file(full, location)
    else:
        raise ConfigError(
            f"timm has no pretrained weights for {full!r} that stillroom can hash ({source or 'no source'}); "
            "pass --teacher-checkpoint FILE"
        )
    classes = cfg.get("num_classes")
    return TeacherWeights(path, full, int(classes) if classes else None, bool(custom), where)


# One request to the hub's endpoint, no retries, before any download: huggingface_hub retries a connection
# that fails for about 25 s per file (54 s for timm's two candidate names) before it says "no network".
HUB_PROBE_TIMEOUT_S = 5.0


def _fetch_failed(full: str, where: str, cache: str, e: Exception, unreachable: Exception | None) -> CheckpointError:
    """One line: what could not be fetched and why, and the two ways on."""
    from huggingface_hub import constants

    reason = (str(e).strip().splitlines() or [""])[0][:120]
    if constants.HF_HUB_OFFLINE:
        why = f"HF_HUB_OFFLINE is set and {cache} does not hold them ({type(e).__name__})"
    elif unreachable is not None:
        detail = (str(unreachable).strip().splitlines() or [""])[0][:120]
        why = (
            f"{constants.ENDPOINT} cannot be reached ({type(unreachable).__name__}: {detail}) and {cache} does not "
            "hold them"
        )
    else:
        why = f"{type(e).__name__}: {reason}; no network? HF_HUB_OFFLINE=1 skips the download retries"
    return CheckpointError(
        f"timm's pretrained weights {full} cannot be fetched from {where}: {why}. On a machine with network run "
        f"python -c \"import timm; timm.create_model('{full}', pretrained=True)\" and copy its cache ({cache}) to "
        "the same place here, or save the weights to a file and pass --teacher-checkpoint FILE"
    )


def hub_unreachable() -> Exception | None:
    """None when the hub's endpoint answers one request (any status) within ``HUB_PROBE_TIMEOUT_S``, else the
    error. The request goes through huggingface_hub's own HTTP session: its proxies, certificates and headers."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as e:  # DNS, refused, timeout, proxy, TLS: the hub cannot be reached from here
        return e
    return None


def _hub_file(full: str, location: str | tuple[str, str]) -> tuple[str, str]:
    """The hub file timm's ``load_state_dict_from_hf`` would read: the safetensors twin first, as timm tries it.

    Without network (and without ``HF_HUB_OFFLINE``) the hub's local cache is read at once, as huggingface_hub
    itself falls back to it, but without first retrying the connection for most of a minute.
    """
    from huggingface_hub import constants
    from huggingface_hub.errors import EntryNotFoundError
    from timm.models._hub import _get_safe_alternatives, hf_hub_download, hf_split

    repo, filename = location if isinstance(location, tuple) else (location, _HF_ALTERNATIVES_OF)
    repo_id, revision = hf_split(repo)
    names = [filename] if filename.endswith(".safetensors") else [*_get_safe_alternatives(filename), filename]
    unreachable = None if constants.HF_HUB_OFFLINE else hub_unreachable()
    where, first = f"the Hugging Face hub ({repo})", None
    for i, candidate in enumerate(names):
        try:
            kw = {"local_files_only": True} if unreachable is not None else {}
            path = hf_hub_download(repo_id=repo_id, filename=candidate, revision=revision, **kw)
            return str(path), f"the Hugging Face hub ({repo}, {candidate})"
        except EntryNotFoundError as e:  # timm, too, goes on to the next name on any "not found"
            first = first or e
            if i + 1 < len(names):
                continue
            raise _fetch_failed(full, where, constants.HF_HUB_CACHE, first, unreachable) from e
        except Exception as e:
            raise _fetch_failed(full, where, constants.HF_HUB_CACHE, e, unreachable) from e
    raise AssertionError("unreachable")


def _url_file(full: str, url: str) -> tuple[str, str]:
    """The file torch hub's cache holds for ``url`` (downloaded first if it is not there), as timm loads it."""
    from timm.models import _builder
    from timm.models._hub import download_cached_file, get_cache_dir

    try:
        path = download_cached_file(url, check_hash=getattr(_builder, "_CHECK_HASH", False), progress=False)
    except Exception as e:
        raise _fetch_failed(full, url, get_cache_dir(), e, None) from e
    return str(path), url


def recorded_weights(recorded: dict[str, Any], checkpoint: str | None, where: str) -> TeacherWeights:
    """The weights of a cache's recorded teacher: ``checkpoint`` when given, else (for a cache made with timm's
    pretrained weights) those weights found again by name; a checkpoint-made cache needs its file back."""
    if checkpoint:
        return TeacherWeights(checkpoint)
    if not recorded.get("pretrained"):
        raise ConfigError(
            f"--teacher-checkpoint is required: {where} was made from a teacher checkpoint "
            f"(sha256 {str(recorded['checkpoint_sha256'])[:16]}...), not timm's pretrained weights"
        )
    return teacher_weights(recorded["name"], None, True, recorded.get("kwargs"))


def is_recorded(weights: TeacherWeights, recorded: dict[str, Any]) -> bool:
    """Whether ``weights`` are the very file a cache recorded (its SHA-256)."""
    return weights.sha256 == recorded["checkpoint_sha256"]
