"""`mbrl-bilevel bench <target>`: benchmarks as commands. Each prints ratios measured in one
process run and writes runs/<name>/summary.json.

`bench plan` times the PETS planner, which lives in `agents`: this package does not import it, so
the composition root (cli.py) passes its runner in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import tyro

from mbrl_bilevel.solvers.bench import SolverBenchConfig
from mbrl_bilevel.train_bench import TrainBenchConfig
from mbrl_bilevel.validation import ConfigError


@dataclass(frozen=True)
class PlanBenchConfig:
    """Options of `bench plan`."""

    presets: str = "cpu,pets"
    """Comma-separated PETS presets to time (agents.pets.PRESETS)."""
    dtypes: str = "float32"
    """Comma-separated planning dtypes: float32, bfloat16."""
    obs_dim: int = 17
    """Observation dimension (HalfCheetah-v5: 17; its task reward is used)."""
    action_dim: int = 6
    """Action dimension (HalfCheetah-v5: 6)."""
    steps: int = 5
    """Timed env steps (planning calls) per preset and dtype, after one warm-up step."""
    threads: int = 1
    """Torch threads."""


PlanRunner = Callable[[PlanBenchConfig], tuple[list[dict], dict]]


@dataclass(frozen=True)
class BenchConfig:
    """Run one benchmark."""

    target: tyro.conf.Positional[Literal["solvers", "train", "plan"]]
    """What to benchmark: solvers (one outer step of each solver vs one inner PG step), train
    (ensemble training throughput vs the matmul rate) or plan (PETS planning time per env step
    vs the matmul time of its model evaluations)."""
    solvers: SolverBenchConfig = field(default_factory=SolverBenchConfig)
    """Options of `bench solvers`."""
    train: TrainBenchConfig = field(default_factory=TrainBenchConfig)
    """Options of `bench train`."""
    plan: PlanBenchConfig = field(default_factory=PlanBenchConfig)
    """Options of `bench plan`."""
    name: str | None = None
    """Run name; default bench-<target>-<date>-<time>."""
    out_dir: str = "runs"
    """Parent folder of run folders."""


def run_bench(config: BenchConfig, plan_runner: PlanRunner | None = None) -> str:
    """Run the benchmark, write its run folder, return the printed report. `bench plan` needs
    `plan_runner` (agents.plan_bench.run_plan_bench)."""
    from mbrl_bilevel.solvers.bench import run_solver_bench
    from mbrl_bilevel.train_bench import run_train_bench

    if config.target == "solvers":
        rows, context = run_solver_bench(config.solvers)
        cells = [
            [r["candidate"], f"{r['median_ms']:.2f}", f"{r['ratio_to_inner_step']:.2f}"]
            for r in rows
        ]
        head = ["candidate", "median ms", "ratio to one inner PG step"]
        title = f"θ has {context['theta_params']} parameters; torch threads {context['threads']}"
        return _report(config, rows, context, head, cells, title, after=True)
    if config.target == "train":
        rows, context = run_train_bench(config.train)
        train = config.train
        title = (
            f"ensemble training, E = {train.members}, hidden {train.hidden}, batch "
            f"{train.batch_size} per member, {train.threads} torch thread(s), CPU time of this "
            "thread:"
        )
    else:
        if plan_runner is None:
            raise ConfigError("bench plan needs the agents package: run `mbrl-bilevel bench plan`")
        rows, context = plan_runner(config.plan)
        title = (
            f"PETS planning per env step, obs {config.plan.obs_dim}, actions "
            f"{config.plan.action_dim}, {config.plan.threads} torch thread(s), CPU time of this "
            "thread; lower bound = linear-layer FLOPs of the elite members at the fp32 matmul "
            "rate:"
        )
    cells = [[f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()] for row in rows]
    return _report(config, rows, context, list(rows[0]), cells, title)


def _report(config, rows, context, head, cells, title: str, after: bool = False) -> str:
    """Write config.json, summary.json and table.md into a new run folder; return the report
    (the title before the table, or after it with `after`)."""
    from mbrl_bilevel.reporting import markdown_table
    from mbrl_bilevel.runs import atomic_write_text, create_run_dir, write_json

    run_dir = create_run_dir(config.out_dir, config.name, f"bench-{config.target}")
    write_json(run_dir / "config.json", config)
    write_json(run_dir / "summary.json", {"rows": rows, "context": context})
    table = markdown_table(head, cells)
    atomic_write_text(run_dir / "table.md", table + "\n")
    body = f"{table}\n\n{title}." if after else f"{title}\n\n{table}\n"
    return (
        f"{body}\n1-min load average before/after {context['load_average_1min_before_after']} on "
        f"{context['cpu_count']} CPUs.\nrun folder: {run_dir}"
    )
