"""Helpers for the frozen config dataclasses: rebuild one from its saved dict, replace fields by
dotted path, flatten it for tables, and check that fields are positive."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from mbrl_bilevel.validation import ConfigError


def from_dict(config_type: type, values: dict[str, Any]) -> Any:
    """The `config_type` instance of `values` (as dataclasses.asdict wrote it, e.g. in a
    config.json): nested dataclass fields are rebuilt from their dicts and lists become tuples.
    Fields missing from `values` keep their defaults; unknown keys are a ConfigError."""
    hints = typing.get_type_hints(config_type)
    names = {f.name for f in dataclasses.fields(config_type)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"{config_type.__name__} has no fields {sorted(unknown)}")
    kwargs = {}
    for name, value in values.items():
        if dataclasses.is_dataclass(hints[name]) and isinstance(value, dict):
            value = from_dict(hints[name], value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return config_type(**kwargs)


def replace_fields(config: Any, updates: dict[str, Any]) -> Any:
    """`config` with the fields named by dotted paths ("mbpo.updates_per_step") replaced."""
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for path, value in updates.items():
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            top[head] = value
    for head, inner in nested.items():
        top[head] = replace_fields(getattr(config, head), inner)
    return dataclasses.replace(config, **top)


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as one level with dotted keys: {"mbpo": {"tau": 1}} -> {"mbpo.tau": 1}."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def env_name(env_id: str) -> str:
    """The env id without its namespace and version, as presets and reports key envs:
    "mbrl_bilevel/PointMass-v0" -> "PointMass", "HalfCheetah-v5" -> "HalfCheetah"."""
    return env_id.rsplit("/", 1)[-1].split("-v")[0]


def check_positive_fields(config: Any, names: tuple[str, ...], flag_prefix: str = "") -> None:
    """Raise ConfigError naming the first of `names` whose value in `config` is not > 0 (a tuple
    field: each of its entries)."""
    for name in names:
        value = getattr(config, name)
        values = value if isinstance(value, tuple) else (value,)
        if not values or any(v <= 0 for v in values):
            flag = f"--{flag_prefix}{name}".replace("_", "-")
            raise ConfigError(f"{flag} must be > 0, got {value!r}")
