"""What each run of a sweep needs: skip it (finished), resume it (an interrupted resumable run)
or start it; every run's options parsed and checked before anything runs."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mbrl_bilevel.runs import FINISHED
from mbrl_bilevel.sweep.arguments import parse, to_argv
from mbrl_bilevel.sweep.backends import Task
from mbrl_bilevel.sweep.spec import Sweep
from mbrl_bilevel.validation import ConfigError


@dataclasses.dataclass(frozen=True)
class Plan:
    """The tasks to run (fresh or resumed, in grid order) and the runs already finished."""

    tasks: list[Task]
    resumed: list[str]
    finished: list[str]


def plan_sweep(
    sweep: Sweep,
    config_type: type,
    check: Callable[[Any], None],
    module: str,
    default: Callable[[list[str]], Any] | None = None,
) -> Plan:
    """Parse (on top of `default(args)`, where given) and `check` every run's config
    (ConfigError naming the run), then sort the runs by the state of their folders
    sweep.folder/<run>. Commands without `name` and `out_dir` fields (eval, collect) make no run
    folder: their runs always start."""
    folder = sweep.folder.resolve()
    fields = {field.name for field in dataclasses.fields(config_type)}
    quiet = {"progress": False} if "progress" in fields else {}
    own_folder = {"name", "out_dir"} <= fields
    tasks, resumed, finished = [], [], []
    for run in sweep.runs:
        where = f"run {run.name}"
        place = {"name": run.name, "out_dir": str(folder)} if own_folder else {}
        args = to_argv(config_type, {**quiet, **run.options, **place})
        config = parse(config_type, args, where, default)
        try:
            check(config)
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None
        run_dir = folder / run.name
        saved = _saved_config(run_dir) if own_folder else None
        if saved is not None:
            _check_same(saved, config, run.options, run_dir)
        if own_folder and (run_dir / FINISHED).is_file():
            finished.append(run.name)
            continue
        if saved is not None and "resume" in fields:
            args = to_argv(config_type, {**quiet, "resume": str(run_dir)})
            resumed.append(run.name)
        log = folder / "logs" / f"{run.name}.log"
        tasks.append(Task(run.name, module, [sweep.command, *args], str(log)))
    return Plan(tasks, resumed, finished)


def _saved_config(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _check_same(saved: dict[str, Any], config: Any, options: dict[str, Any], run_dir: Path):
    """Raise ConfigError if the run folder was made with other values of the spec's options."""
    for path in options:
        old, new = saved, config
        for part in path.split("."):
            old = old.get(part) if isinstance(old, dict) else None
            new = getattr(new, part)
        new = json.loads(json.dumps(new, default=str))
        if old != new:
            raise ConfigError(
                f"{run_dir} holds a run with {path} = {old!r} but the spec now says {new!r}: "
                "remove that folder or give the sweep another name"
            )
