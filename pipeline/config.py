"""Options declared once, read from YAML and flags, resolved into typed dataclasses.

An option is a dataclass field made by :func:`option`: its name, type, default, help text and
choices are written there and nowhere else. The CLI builds its flags from these fields
(``cli/flags.py``), YAML files use the same names, and :func:`resolve` merges them with the
precedence defaults < YAML file (``--config``) < flags given on the command line. Unknown keys,
values of the wrong type and values outside the declared choices are errors that name the key and
where it came from, so a typo never silently falls back to a default. Each config class checks
its own cross-field rules in a ``check()`` method, called here once the values are merged.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import yaml

from pipeline.errors import ConfigError
from pipeline.files import writable_folder, write_text

T = TypeVar("T")


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    choices: Sequence[str] | None = None,
    factory: Callable[[], Any] | None = None,
    positional: bool = False,
    metavar: str | None = None,
    on_resume: str | None = None,
) -> Any:
    """A config field: the one declaration of an option.

    Args:
        default: The default value (use ``factory`` for lists and dicts).
        help: What the option does, as ``--help`` shows it (the default is appended there).
        choices: The allowed values of a string option; anything else is refused by name.
        factory: Builds a mutable default.
        positional: A command-line argument rather than a ``--flag``.
        metavar: What ``--help`` calls the value, where the type's name would mislead (``NAME``, not ``URL``).
        on_resume: What a new value does to a run on ``--resume``, for options of a run that resumes
            (``pipeline.train_options.ROLES``: every ``train-student`` option declares one).
    """
    meta = {
        "help": help,
        "choices": tuple(choices) if choices else None,
        "positional": positional,
        "metavar": metavar,
        "on_resume": on_resume,
    }
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def fields(cls: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls))


def panel_of(cls: type, name: str) -> str | None:
    """The section an option is declared in (its class's ``PANEL``: the group ``--help`` shows it under), for
    configs built from section dataclasses (:class:`pipeline.train_options.TrainConfig`); None for flat ones."""
    for base in cls.__mro__:
        if name in vars(base).get("__annotations__", {}):
            return vars(base).get("PANEL")
    return None


def default_of(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None if f.default is dataclasses.MISSING else f.default


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def read_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r}: top level must be a mapping, got {type(data).__name__}")
    return data


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: not a YAML/JSON mapping ({e})") from None
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping such as {{key: value}}, got {value!r}")
    return dict(value)


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Turn a YAML or command-line value into ``tp``; ``where`` names the option in errors.

    A string for a list of numbers may be comma separated (``1,3``); a string for a mapping is read
    as YAML (``{img_size: 32}``). A string for a list of strings is one item: shard specs may hold
    spaces (``pipe:`` commands) and commas (brace patterns), so they are never split.
    """
    if value is None:
        return None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if str in options and isinstance(value, str) and not value.lstrip().startswith("{"):
            return value  # e.g. a recipe name, not a mapping
        for a in options:
            try:
                return coerce(value, a, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: cannot use {value!r} (expected {_type_name(tp)})")
    if origin in (list, tuple):
        inner = args[0] if args else Any
        if isinstance(value, str):
            items: list[Any] = [value] if inner is str else [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            items = [value]
        return [coerce(v, inner, where) for v in items]
    if origin is dict or tp is dict:
        return _mapping(value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool) or (tp is int and isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        try:
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "")


def from_mapping(cls: type[T], data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Validate and coerce a mapping of ``cls`` option names (``view_block`` or ``view-block``)."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})")
        values[name] = coerce(value, hints[name], f"{where}: {key}")
    return values


def check_choices(cfg: Any) -> None:
    """Refuse a value outside its option's declared choices; for a list, any item outside them."""
    for f in fields(type(cfg)):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        for item in value if isinstance(value, list) else [value]:
            if choices and item is not None and item not in choices:
                raise ConfigError(f"{flag_name(f.name)} {item!r}: expected one of {', '.join(choices)}")


def check_finite(cfg: Any) -> None:
    """Refuse a number option (or an item of a list of numbers) that is NaN or infinite, naming it: no option
    means anything at NaN or infinity, and such a value passes every range check (``nan < 0`` is False)."""
    for f in fields(type(cfg)):
        value = getattr(cfg, f.name)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{flag_name(f.name)} {item}: must be a finite number")


def resolve(cls: type[T], config_path: str | None = None, overrides: Mapping[str, Any] | None = None) -> T:
    """Build and check ``cls`` from its defaults, an optional YAML file and overrides.

    ``overrides`` are option values given on the command line, by field name; ``None`` means the flag
    was not given.
    """
    values: dict[str, Any] = {}
    if config_path:
        values.update(from_mapping(cls, read_yaml(config_path), f"config file {config_path!r}"))
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        if name not in known:
            raise ConfigError(f"unknown option {flag_name(name)}")
        values[name] = coerce(value, hints[name], flag_name(name))
    return checked(cls(**values))


def checked(cfg: T) -> T:
    """Check a config built in code (declared choices, then the class's own rules); returns it.

    A string given in code for a list of strings (``cache="c.zarr"``) is that list's one item, as on the
    command line. A list of strings with declared choices is also split at commas (``tensorboard,wandb``):
    its items are names, never shard specs whose commas belong to them.
    """
    hints = typing.get_type_hints(type(cfg))
    for f in fields(type(cfg)):
        if hints[f.name] == list[str] and isinstance(getattr(cfg, f.name), str):
            setattr(cfg, f.name, [getattr(cfg, f.name)])
        if hints[f.name] == list[str] and f.metadata.get("choices"):
            setattr(cfg, f.name, [x.strip() for v in getattr(cfg, f.name) for x in v.split(",") if x.strip()])
    check_choices(cfg)
    check_finite(cfg)
    check = getattr(cfg, "check", None)
    if check is not None:
        check()
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def write_resolved(cfg: Any, out_dir: str, name: str = "resolved-config.yaml") -> str:
    """Write the resolved config as YAML next to the outputs, whole or not at all (one line naming it if not)."""
    writable_folder(out_dir, "--out")
    path = os.path.join(out_dir, name)
    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path
