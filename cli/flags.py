"""Typer commands whose flags are generated from the option dataclasses of :mod:`pipeline.options`.

A field becomes ``--field-name`` (or a positional argument), with its help text, its declared
choices and its default shown in ``--help``. Flags default to ``None`` here, meaning "not given", so
that :func:`pipeline.config.resolve` can apply the precedence defaults < ``--config`` YAML < flags.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any

import typer

from pipeline.config import default_of, fields, flag_name, panel_of, resolve


def _cli_type(tp: Any) -> Any:
    """The type typer parses: scalars and lists of strings natively, anything else as a string."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        return _cli_type(options[0]) if len(options) == 1 else str
    if tp in (bool, int, float, str):
        return tp
    if origin is list and args == (str,):
        return list[str]
    return str  # lists of numbers ("1,3"), mappings and recipes ("{img_size: 32}"): parsed by resolve


def _shown_default(f: dataclasses.Field) -> str:
    value = default_of(f)
    if value in (None, [], {}, ""):
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def _help(f: dataclasses.Field) -> str:
    text = f.metadata["help"]
    if f.metadata.get("choices"):
        text += f" (one of: {', '.join(f.metadata['choices'])})"
    if not f.metadata.get("positional"):
        text += f" (default: {_shown_default(f)})"
    return text


_METAVARS = {int: "INT", float: "NUMBER", str: "TEXT", list[str]: "URL"}


def _parameter(f: dataclasses.Field, tp: Any, panel: str | None = None) -> inspect.Parameter:
    cli_type = _cli_type(tp)
    if f.metadata.get("positional"):
        default = typer.Argument(..., help=_help(f), show_default=False, rich_help_panel=panel)
    else:
        names = [f"{flag_name(f.name)}/--no-{f.name.replace('_', '-')}"] if cli_type is bool else [flag_name(f.name)]
        metavar = f.metadata.get("metavar") or (_METAVARS.get(cli_type) if cli_type is not bool else None)
        default = typer.Option(None, *names, help=_help(f), show_default=False, metavar=metavar, rich_help_panel=panel)
    annotation = cli_type if f.metadata.get("positional") else cli_type | None
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def command_from(cls: type, action: Callable[[Callable[[], Any]], None], doc: str) -> Callable[..., None]:
    """A typer command function taking every option of ``cls`` plus ``--config FILE``.

    The function calls ``action`` with a function that resolves the config (``--config`` YAML, then
    the flags given), so that ``action`` handles a bad option like any other expected failure.
    """
    hints = typing.get_type_hints(cls)
    params = [_parameter(f, hints[f.name], panel_of(cls, f.name)) for f in fields(cls)]
    config = typer.Option(None, "--config", help="YAML file with any of these options (flags override it)")
    params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=config, annotation=str | None))

    def command(**kwargs: Any) -> None:
        path = kwargs.pop("config", None)
        action(lambda: resolve(cls, path, kwargs))

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = doc
    command.__name__ = cls.__name__
    return command
