"""Command-line arguments of one run: options {field: value} to argv, checked by parsing them
with tyro exactly as `mbrl-bilevel <command>` will."""

from __future__ import annotations

import contextlib
import io
import typing
from typing import Any

import tyro

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


def parse(config_type: type, argv: list[str], where: str) -> Any:
    """The config that `argv` gives, or ConfigError with tyro's reason and `where` it came from."""
    output = io.StringIO()
    try:
        with contextlib.redirect_stderr(output), contextlib.redirect_stdout(output):
            return tyro.cli(config_type, args=argv)
    except SystemExit:
        # tyro prints a title, a rule, then the reason ("Error parsing --steps: ...")
        lines = [line.strip(" │") for line in output.getvalue().splitlines()]
        lines = [line for line in lines if set(line) - set("-─ ")]
        reason = lines[1] if len(lines) > 1 else " ".join(argv)
        raise ConfigError(f"{where}: {reason}") from None


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
