"""tyro's parse of a command's arguments with its usage errors as one-line ConfigErrors, for the
CLI and for the sweeps that check their runs' arguments the same way."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import tyro

from mbrl_bilevel.validation import ConfigError

RULE = set("-─ ")
"""The characters of the rules in tyro's boxes (unicode on a terminal, ASCII elsewhere)."""


def parse_config(
    config_type: type, args: Sequence[str], default: Any = None, prog: str | None = None
) -> Any:
    """The `config_type` that `args` give on top of `default` (tyro). A usage error (an unknown
    option, a bad value, a ConfigError of the config's own checks) is a ConfigError with tyro's
    reason on one line; --help prints and exits 0 as usual."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return tyro.cli(config_type, args=list(args), default=default, prog=prog)
    except SystemExit as exit_:
        if exit_.code in (0, None):
            raise
        raise ConfigError(tyro_reason(errors.getvalue()) or " ".join(args)) from None


def tyro_reason(message: str) -> str:
    """The reason in tyro's error box (a title, the reason wrapped over lines, a rule, help), as
    one line: "--model.members must be > 0, got 0"."""
    lines = [line.strip(" │╭╮╰╯") for line in message.splitlines()]
    lines = [line for line in lines if line]
    body: list[str] = []
    for line in lines[1:]:  # the first block of text between rules (boxes differ by terminal)
        if set(line) - RULE:
            body.append(line)
        elif body:
            break
    reason = " ".join(body)
    if reason.startswith("Error parsing ") and ": " in reason:
        where, detail = reason.removeprefix("Error parsing ").split(": ", 1)
        reason = f"{where}: {detail}" if where.startswith("--") else detail  # a flag, or a group
    return reason
