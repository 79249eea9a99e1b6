"""`mbrl-bilevel sweep SPEC.toml`: every point of a grid as its own run folder, locally or on
Ray; finished runs are skipped, interrupted ones resumed, failed ones recorded and retried."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tyro
from tqdm.auto import tqdm

from mbrl_bilevel.runs import write_json
from mbrl_bilevel.sweep.backends import Outcome, run_tasks
from mbrl_bilevel.sweep.plan import plan_sweep
from mbrl_bilevel.sweep.spec import load_spec
from mbrl_bilevel.validation import ConfigError


@dataclass(frozen=True)
class SweepConfig:
    """Run a grid of any mbrl-bilevel command, described by a TOML spec (docs/sweeps.md)."""

    spec: tyro.conf.Positional[str]
    """The sweep spec, a TOML file."""
    backend: Literal["local", "ray"] = "local"
    """local: a pool of --jobs processes; ray: Ray tasks of one CPU each (extra [ray])."""
    jobs: int = 2
    """Runs at once on the local backend, and the CPUs of a local Ray instance."""
    address: str | None = None
    """Ray cluster address (auto, or ray://host:10001); none: start a local Ray instance."""
    report: bool = True
    """At the end, write the report of the finished runs to runs/<sweep>/report/."""
    dry_run: bool = False
    """Check the spec and print what each run would do (start, resume, skip); run nothing."""


def run_sweep(
    config: SweepConfig,
    commands: dict[str, type],
    check: Callable[[Any], None],
    module: str,
    defaults: dict[str, Callable[[list[str]], Any]] | None = None,
) -> tuple[list[Outcome], Path]:
    """Check the spec and every run's options, run what is not finished, write
    runs/<sweep>/status.json as runs end. Returns the outcomes of the runs started now and the
    sweep folder.

    `commands` maps command names to config dataclasses, `check(config)` raises ConfigError for
    a bad config, `python -m <module> <command> ...` runs one command, and `defaults` maps the
    commands whose defaults depend on their arguments to args -> default config (cli.DEFAULTS).
    """
    if config.jobs <= 0:
        raise ConfigError(f"--jobs must be > 0, got {config.jobs}")
    sweep = load_spec(config.spec, commands)
    default = (defaults or {}).get(sweep.command)
    plan = plan_sweep(sweep, commands[sweep.command], check, module, default)
    print(
        f"sweep {sweep.name}: {len(sweep.runs)} runs of `{sweep.command}` over "
        f"{', '.join(sweep.grid_fields)}: {len(plan.finished)} finished, "
        f"{len(plan.resumed)} to resume, {len(plan.tasks) - len(plan.resumed)} to start"
    )
    if config.dry_run:
        for task in plan.tasks:
            print(f"  {task.run}: {' '.join(task.args)}")
        return [], sweep.folder
    folder = sweep.folder.resolve()
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config.spec, folder / "sweep.toml")
    status = {
        "sweep": sweep.name,
        "command": sweep.command,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "runs": {run: {"state": "finished before"} for run in plan.finished}
        | {
            task.run: {"state": "pending", "args": task.args, "log": task.log}
            for task in plan.tasks
        },
    }
    write_json(folder / "status.json", status)
    outcomes: list[Outcome] = []
    bar = tqdm(total=len(plan.tasks), desc=f"sweep {sweep.name}", disable=None)

    def record(outcome: Outcome) -> None:
        outcomes.append(outcome)
        entry = status["runs"][outcome.run]
        entry |= {"state": "done" if outcome.returncode == 0 else "failed"}
        entry |= {"seconds": round(outcome.seconds, 1), "error": outcome.error}
        write_json(folder / "status.json", status)
        if outcome.error:
            tqdm.write(f"FAILED {outcome.run}: {outcome.error}")
        bar.update()

    try:
        run_tasks(plan.tasks, config.backend, config.jobs, config.address, record)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C or SIGTERM
        for entry in status["runs"].values():
            if entry["state"] == "pending":
                entry["state"] = "interrupted"
        write_json(folder / "status.json", status)
        raise
    finally:
        bar.close()
    print(summary_text(sweep.name, len(plan.finished), outcomes, folder, config.spec))
    return outcomes, folder


def summary_text(
    name: str, finished_before: int, outcomes: list[Outcome], folder: Path, spec: str
) -> str:
    """What a sweep did: counts, each failed run with its error and log, how to retry."""
    failed = [o for o in outcomes if o.returncode != 0]
    lines = [
        f"sweep {name}: {len(outcomes) - len(failed)} runs done now, {finished_before} finished "
        f"before, {len(failed)} failed; status: {folder / 'status.json'}"
    ]
    for outcome in failed:
        lines.append(
            f"  FAILED {outcome.run} (exit {outcome.returncode}): {outcome.error}\n"
            f"    log: {folder / 'logs' / (outcome.run + '.log')}"
        )
    if failed:
        lines.append(f"re-run `mbrl-bilevel sweep {spec}` to retry the failed runs")
    return "\n".join(lines)
