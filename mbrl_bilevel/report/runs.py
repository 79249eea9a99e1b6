"""Read finished run folders of every kind (train, gaussian, tabular, dynamics) into one shape:
final rows (one per inner group and seed) and learning-curve rows (one per group, seed, step)."""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mbrl_bilevel.configs import flatten
from mbrl_bilevel.validation import ConfigError


@dataclass(frozen=True)
class Kind:
    """What a command's run folder holds: the keys of its inner groups (a study runs several
    methods per folder), its final metrics and its curve metrics."""

    groups: tuple[str, ...]
    metrics: tuple[str, ...]
    curves: tuple[str, ...]
    read: Callable[[Path, dict[str, Any], dict[str, Any]], tuple[list[dict], list[dict]]]
    """(folder, config, summary) -> (final rows, curve rows), rows with the group keys, "seed"
    and, for curves, "step"."""
    facet: str | None = None
    """A key whose values get separate figures (their curves have different scales)."""


@dataclass
class RunData:
    """One run folder: its command, saved config, final rows and curve rows."""

    folder: Path
    command: str
    config: dict[str, Any]
    finals: list[dict[str, Any]] = field(default_factory=list)
    curves: list[dict[str, Any]] = field(default_factory=list)


def read_csv(path: Path) -> list[dict[str, Any]]:
    """CSV rows with numbers as floats and empty cells as None."""
    with open(path, newline="") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _number(text: str) -> Any:
    if text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return text


def _read_train(folder: Path, config: dict, summary: dict) -> tuple[list[dict], list[dict]]:
    """Agent runs: one final row; curves of episode returns and evaluation returns."""
    seed = config["seed"]
    final = {"seed": seed, **{k: summary.get(k) for k in KINDS["train"].metrics}}
    curves = [
        {"seed": seed, "step": row["step"], "episode_return": row["return"]}
        for row in read_csv(folder / "metrics.csv")
    ]
    evaluations = folder / "eval" / "evaluations.npz"
    if evaluations.is_file():
        data = np.load(evaluations)
        curves += [
            {"seed": seed, "step": float(step), "eval_return": float(np.mean(returns))}
            for step, returns in zip(data["timesteps"], data["results"], strict=True)
        ]
    return [final], curves


def _read_gaussian(folder: Path, config: dict, summary: dict) -> tuple[list[dict], list[dict]]:
    """Gaussian studies: metrics.csv holds the curves; the last row per (method, seed) is final."""
    curves = read_csv(folder / "metrics.csv")
    last: dict[tuple, dict] = {}
    for row in curves:
        last[(row["method"], row["seed"])] = row
    return list(last.values()), curves


def _read_tabular(folder: Path, config: dict, summary: dict) -> tuple[list[dict], list[dict]]:
    return read_csv(folder / "metrics.csv"), read_csv(folder / "curves.csv")


def _read_dynamics(folder: Path, config: dict, summary: dict) -> tuple[list[dict], list[dict]]:
    """Dynamics benchmarks: final rows from metrics.csv, validation curves from TensorBoard
    where the run kept its events (results/ archives keep none: finals only)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    finals = read_csv(folder / "metrics.csv")
    curves = []
    for row in finals:
        events_dir = folder / "tb" / f"{row['strategy']}-seed{row['seed']:g}"
        if not events_dir.is_dir():
            continue
        events = EventAccumulator(str(events_dir))
        events.Reload()
        tags = set(events.Tags()["scalars"]) & set(KINDS["dynamics"].curves)
        for tag in sorted(tags):
            curves += [
                {"strategy": row["strategy"], "seed": row["seed"], "step": e.step, tag: e.value}
                for e in events.Scalars(tag)
            ]
    return finals, curves


KINDS: dict[str, Kind] = {
    "train": Kind(
        (),
        ("final_eval_return", "last_episode_return", "seconds_per_env_step"),
        ("eval_return", "episode_return"),
        _read_train,
        facet="env",
    ),
    "gaussian": Kind(
        ("method",),
        ("nll", "mean_error", "cov_error", "theory_error"),
        ("nll", "mean_error", "cov_error"),
        _read_gaussian,
    ),
    "tabular": Kind(
        ("dataset", "method"),
        ("accuracy", "nll", "ece", "macro_f1", "roc_auc"),
        ("curve/accuracy", "curve/nll"),
        _read_tabular,
        facet="dataset",
    ),
    "dynamics": Kind(
        ("strategy",),
        ("rmse", "nll", "cal1", "cal2", "rollout_rmse"),
        ("val/nll", "val/rmse"),
        _read_dynamics,
    ),
}


def load_run(folder: Path, config_types: dict[str, type]) -> RunData:
    """Read a finished run folder (config.json and summary.json), or raise ConfigError; fields
    its config lacks (saved by an older version) get the defaults of its command's config type
    in `config_types`, so it groups with new runs of the same settings."""
    try:
        config = json.loads((folder / "config.json").read_text())
        summary = json.loads((folder / "summary.json").read_text())
    except FileNotFoundError as error:
        raise ConfigError(
            f"{folder} is not a finished run: no {Path(error.filename).name}"
        ) from None
    command = summary.get("command")
    if command not in KINDS:
        raise ConfigError(
            f"{folder} is a {command or 'unknown'} run; report reads {', '.join(KINDS)} runs"
        )
    defaults = flatten(dataclasses.asdict(config_types[command]()))
    config = {**defaults, **flatten(config)}
    finals, curves = KINDS[command].read(folder, config, summary)
    return RunData(folder, command, config, finals, curves)


def find_runs(paths: list[str]) -> list[Path]:
    """Run folders among `paths`: a folder with summary.json is a run, any other folder is
    searched (a sweep folder gives its finished runs), in sorted order."""
    if not paths:
        raise ConfigError("give at least one run folder or folder of runs")
    found = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise ConfigError(f"{path} is not a folder")
        if (path / "summary.json").is_file():
            found.append(path)
        else:
            found += sorted(p.parent for p in path.glob("*/summary.json"))
    if not found:
        raise ConfigError(f"no finished run folders (with summary.json) in {', '.join(paths)}")
    return found
