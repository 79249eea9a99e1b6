"""`mbrl-bilevel bench <target>`: benchmarks as commands. Each prints ratios measured in one
process run and writes runs/<name>/summary.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import tyro

from mbrl_bilevel.solvers.bench import SolverBenchConfig


@dataclass(frozen=True)
class BenchConfig:
    """Run one benchmark."""

    target: tyro.conf.Positional[Literal["solvers"]]
    """What to benchmark: solvers (one outer step of each solver vs one inner PG step)."""
    solvers: SolverBenchConfig = field(default_factory=SolverBenchConfig)
    """Options of `bench solvers`."""
    name: str | None = None
    """Run name; default bench-<target>-<date>-<time>."""
    out_dir: str = "runs"
    """Parent folder of run folders."""


def run_bench(config: BenchConfig) -> str:
    """Run the benchmark, write its run folder, return the printed report."""
    from mbrl_bilevel.reporting import markdown_table
    from mbrl_bilevel.runs import atomic_write_text, create_run_dir, write_json
    from mbrl_bilevel.solvers.bench import run_solver_bench

    rows, context = run_solver_bench(config.solvers)
    run_dir = create_run_dir(config.out_dir, config.name, f"bench-{config.target}")
    write_json(run_dir / "config.json", config)
    write_json(run_dir / "summary.json", {"rows": rows, "context": context})
    table = markdown_table(
        ["candidate", "median ms", "ratio to one inner PG step"],
        [
            [r["candidate"], f"{r['median_ms']:.2f}", f"{r['ratio_to_inner_step']:.2f}"]
            for r in rows
        ],
    )
    atomic_write_text(run_dir / "table.md", table + "\n")
    return (
        f"{table}\n\nθ has {context['theta_params']} parameters; torch threads "
        f"{context['threads']}; 1-min load average before/after "
        f"{context['load_average_1min_before_after']} on {context['cpu_count']} CPUs.\n"
        f"run folder: {run_dir}"
    )
