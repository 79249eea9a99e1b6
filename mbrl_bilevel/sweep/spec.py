"""Sweep specs: a TOML file naming a command, fixed options and a grid, checked before any run.

    command = "train"            # any mbrl-bilevel command
    name = "pointmass"           # optional: runs/<name>/ (default: the file's stem)
    out_dir = "runs"             # optional
    [options]                    # every run gets these
    preset = "tiny"
    [grid]                       # one run per point of the product of these lists
    env = ["mbrl_bilevel/PointMass-v0", "InvertedPendulum-v5"]
    seed = [0, 1]
    [[variants]]                 # optional: each grid point runs once per variant
    preset = "cpu"
    [[variants]]
    preset = "sac"

Option names are the command's dataclass fields (`dynamics_loss` or `dynamics-loss`; nested
fields as `solvers.steps`). The sweep sets `name` and `out_dir` of every run itself.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from mbrl_bilevel.runs import safe_name
from mbrl_bilevel.validation import ConfigError

SET_BY_SWEEP = ("name", "out_dir", "resume")
"""Fields each run gets from the sweep, not from the spec."""
TOP_LEVEL = {"command", "name", "out_dir", "options", "grid", "variants"}


@dataclass(frozen=True)
class Run:
    """One grid point: its run name and its options {field: value} (fixed options included)."""

    name: str
    options: dict[str, Any]


@dataclass(frozen=True)
class Sweep:
    """A checked spec: the command, the sweep folder runs/<name>/ and its runs."""

    command: str
    name: str
    folder: Path
    runs: list[Run]
    grid_fields: list[str]


def load_spec(path: str | Path, commands: dict[str, type]) -> Sweep:
    """Read and check a spec; `commands` maps command names to their config dataclasses."""
    path = Path(path)
    try:
        spec = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"sweep spec {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"sweep spec {str(path)!r} is not valid TOML: {error}") from None
    return parse_spec(spec, commands, default_name=path.stem)


def parse_spec(spec: dict[str, Any], commands: dict[str, type], default_name: str) -> Sweep:
    """The Sweep of a parsed TOML table, or ConfigError naming the first problem."""
    unknown = set(spec) - TOP_LEVEL
    if unknown:
        raise ConfigError(
            f"unknown top-level keys {sorted(unknown)} in the sweep spec; allowed: "
            f"{sorted(TOP_LEVEL)} (command options go under [options] or [grid])"
        )
    command = spec.get("command")
    if command not in commands:
        raise ConfigError(
            f"unknown command {command!r} in the sweep spec; choose from {sorted(commands)}"
        )
    config_type = commands[command]
    options = _normalise(_table(spec, "options"), config_type, "options")
    grid = _normalise(_table(spec, "grid"), config_type, "grid")
    variants = _variants(spec, config_type)
    if not grid and len(variants) < 2:
        raise ConfigError(
            "the sweep spec has an empty grid: give [grid] at least one field "
            "(or at least two [[variants]])"
        )
    for field, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.{field} must be a non-empty list of values, got {values!r}")
    variant_fields = list(dict.fromkeys(f for variant in variants for f in variant))
    for first, second, where in [
        (options, grid, "[options] and in [grid]"),
        (options, variant_fields, "[options] and in [[variants]]"),
        (grid, variant_fields, "[grid] and in [[variants]]"),
    ]:
        both = set(first) & set(second)
        if both:
            raise ConfigError(f"{sorted(both)} are both in {where}")
    name = str(spec.get("name", default_name))
    if not re.fullmatch(r"[\w.=,+-]+", name):
        raise ConfigError(f"sweep name {name!r} must be one folder name (letters, digits, -_.=,+)")
    points = [
        {**dict(zip(grid, values, strict=True)), **variant}
        for values in itertools.product(*grid.values())
        for variant in variants
    ]
    names = run_names(points)
    runs = [Run(n, {**options, **point}) for n, point in zip(names, points, strict=True)]
    folder = Path(spec.get("out_dir", "runs")) / name
    return Sweep(command, name, folder, runs, [*grid, *variant_fields])


def _variants(spec: dict[str, Any], config_type: type) -> list[dict[str, Any]]:
    """The [[variants]] tables, checked; [{}] (one variant, no options) when there are none."""
    variants = spec.get("variants", [{}])
    if not isinstance(variants, list) or not variants:
        raise ConfigError(
            f"variants must be a list of tables ([[variants]] blocks), got {variants!r}"
        )
    for variant in variants:
        if not isinstance(variant, dict):
            raise ConfigError(f"each [[variants]] entry must be a table, got {variant!r}")
    return [_normalise(variant, config_type, "variants") for variant in variants]


def _table(spec: dict[str, Any], key: str) -> dict[str, Any]:
    table = spec.get(key, {})
    if not isinstance(table, dict):
        raise ConfigError(f"[{key}] must be a table of option = value, got {table!r}")
    return table


def _normalise(table: dict[str, Any], config_type: type, where: str) -> dict[str, Any]:
    """`table` with keys as field paths (dashes to underscores), each checked to exist."""
    result = {}
    for key, value in table.items():
        field = key.replace("-", "_")
        check_field(config_type, field, where)
        result[field] = value
    return result


def check_field(config_type: type, path: str, where: str) -> None:
    """Raise ConfigError unless `path` (a.b.c) names a field of the dataclass `config_type`."""
    head, _, rest = path.partition(".")
    fields = {f.name: f for f in dataclasses.fields(config_type)}
    if head in SET_BY_SWEEP:
        raise ConfigError(f"{where}.{path}: the sweep sets {head!r} of each run itself")
    if head not in fields:
        close = difflib.get_close_matches(head, fields, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"unknown field {head!r} in [{where}] for {config_type.__name__}{hint}; "
            f"fields: {', '.join(f for f in fields if f not in SET_BY_SWEEP)}"
        )
    if rest:
        nested = typing.get_type_hints(config_type)[head]
        if not dataclasses.is_dataclass(nested):
            raise ConfigError(f"[{where}] {path}: {head!r} has no sub-fields")
        check_field(nested, rest, where)


def run_names(points: list[dict[str, Any]]) -> list[str]:
    """Deterministic folder names `field=value,...` of grid points (a hash where they clash)."""
    names = [",".join(f"{k}={safe_name(v)}" for k, v in point.items()) for point in points]
    clashes = {n for n in names if names.count(n) > 1 or len(n) > 120}
    return [
        f"{n[:100]}-{hashlib.sha1(repr(sorted(p.items())).encode()).hexdigest()[:8]}"
        if n in clashes
        else n
        for n, p in zip(names, points, strict=True)
    ]
