"""YAML configs with CLI overrides, resolved into typed dataclasses.

Precedence: dataclass defaults < YAML file (``--config``) < explicit CLI flags. Unknown keys are
errors that name the key and the file, so a typo never silently falls back to a default. The
resolved config is written next to the outputs (``resolved-config.yaml``).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and key."""


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


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Light coercion for YAML/CLI values (e.g. '1,3' -> [1.0, 3.0] for list[float])."""
    if value is None:
        return None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        for a in non_none:
            try:
                return _coerce(value, a, where)
            except (ConfigError, TypeError, ValueError):
                continue
        raise ConfigError(f"{where}: cannot use {value!r} as {tp}")
    if origin in (list, tuple):
        inner = args[0] if args else Any
        items = value.split(",") if isinstance(value, str) else list(value)
        return [_coerce(v, inner, where) for v in items if v != ""]
    if tp is bool and isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected a boolean, got {value!r}")
    if tp in (int, float, str):
        try:
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    return value


def from_mapping(cls: type[T], data: dict[str, Any], where: str) -> dict[str, Any]:
    """Validate and coerce a mapping of ``cls`` fields; ``where`` names the source in errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(fields))})")
        values[name] = _coerce(value, hints[name], f"{where}: {key}")
    return values


def resolve(cls: type[T], config_path: str | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Build ``cls`` from defaults, an optional YAML file and CLI overrides (``None`` = not given)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    if config_path:
        values.update(from_mapping(cls, read_yaml(config_path), f"config file {config_path!r}"))
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        name = key.replace("-", "_")
        if name not in fields:
            raise ConfigError(f"unknown option {key!r}")
        values[name] = _coerce(value, hints[name], f"--{key.replace('_', '-')}")
    return cls(**values)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def write_resolved(cfg: Any, out_dir: str, name: str = "resolved-config.yaml") -> str:
    """Write the resolved config as YAML next to the outputs (atomic)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)
    return path
