"""Command-line arguments of one run: options {field: value} to argv, checked by parsing them
with tyro exactly as `mbrl-bilevel <command>` will."""

from __future__ import annotations

import contextlib
import io
import typing
from collections.abc import Callable
from typing import Any

import tyro

from mbrl_bilevel.command_line import parse_config
from mbrl_bilevel.validation import ConfigError


def to_argv(config_type: type, options: dict[str, Any]) -> list[str]:
    """argv for `options`: positional fields first, then `--field-name value` (booleans as
    `--flag` / `--no-flag`, nested fields as `--outer.inner`, lists comma-joined)."""
    positional, flags = [], []
    for path, value in options.items():
        if _is_positional(config_type, path):
            positional.append(_text(value))
        elif isinstance(value, bool):
            head, dot, last = path.rpartition(".")
            flags.append(f"--{head}{dot}{'' if value else 'no-'}{last}".replace("_", "-"))
        else:
            flags += ["--" + path.replace("_", "-"), _text(value)]
    return positional + flags


def parse(
    config_type: type,
    argv: list[str],
    where: str,
    default: Callable[[list[str]], Any] | None = None,
) -> Any:
    """The config that `argv` gives (on top of `default(argv)`, where given), or ConfigError with
    tyro's reason and `where` it came from."""
    try:
        start = default(argv) if default is not None else None
        with contextlib.redirect_stdout(io.StringIO()):
            return parse_config(config_type, argv, start)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def _is_positional(config_type: type, path: str) -> bool:
    *parents, last = path.split(".")
    for parent in parents:
        config_type = typing.get_type_hints(config_type)[parent]
    hint = typing.get_type_hints(config_type, include_extras=True)[last]
    return any(marker is tyro.conf.Positional for marker in getattr(hint, "__metadata__", ()))


def _text(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)
