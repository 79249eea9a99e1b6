"""The composition root: `mbrl-bilevel <command> [options]`, one command per study or agent.

Every command validates its config, runs, writes runs/<name>/ (config.json, summary.json, ...)
and prints where its run folder is. User mistakes print one line and exit with status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import tyro

from agents.commands import EvalConfig, TrainConfig, run_eval, run_train, train_defaults
from envs.collect_command import CollectConfig, run_collect
from mbrl_bilevel.allocator import keep_freed_memory
from mbrl_bilevel.bench import BenchConfig
from mbrl_bilevel.command_line import parse_config
from mbrl_bilevel.dynamics import DynamicsConfig
from mbrl_bilevel.gaussian import GaussianConfig
from mbrl_bilevel.report.command import ReportConfig, run_report, write_report
from mbrl_bilevel.sweep.command import SweepConfig
from mbrl_bilevel.tabular.study import TabularConfig
from mbrl_bilevel.validation import ConfigError


def run_gaussian(config: GaussianConfig) -> None:
    from mbrl_bilevel.gaussian import run_study

    run_dir, summary, table = run_study(config)
    print(f"\nGaussian study, {config.seeds} seeds, final metrics (mean ± std):\n")
    print(table)
    print(f"\noracle NLL (true distribution): {summary['oracle_nll']:.4f} nats/sample")
    print(f"run folder: {run_dir}")


def load_transitions(config: DynamicsConfig):
    """The dataset of `mbrl-bilevel dynamics`: a .npz path or a Minari id (envs' loader); with
    no --dataset, a HalfCheetah-v5 random-policy dataset of --collect-steps transitions."""
    from envs import make_env
    from envs.collect import collect
    from envs.datasets import load_transitions as load

    if config.dataset is not None:
        return load(config.dataset)
    print(f"no --dataset: collecting {config.collect_steps} HalfCheetah-v5 random transitions")
    return collect(make_env("HalfCheetah-v5", seed=0), config.collect_steps, seed=0)


def run_dynamics(config: DynamicsConfig) -> None:
    from mbrl_bilevel.dynamics import run_study

    config.validate()
    transitions = load_transitions(config)
    run_dir, summary, table = run_study(config, transitions)
    print(
        f"\nDynamics benchmark, protocol {config.protocol}, {summary['transitions']} transitions, "
        f"{config.seeds} seeds, test metrics (mean ± std):\n"
    )
    print(table)
    print(f"run folder: {run_dir}")


def run_bench(config: BenchConfig) -> None:
    from agents.plan_bench import run_plan_bench
    from mbrl_bilevel.bench import run_bench as run

    print(run(config, plan_runner=run_plan_bench))


def run_tabular(config: TabularConfig) -> None:
    from mbrl_bilevel.tabular.study import run_study

    run_dir, summary, table = run_study(config)
    print(f"\nTabular study, {config.seeds} seeds, test metrics (mean ± std):\n")
    print(table)
    print(f"\nrun folder: {run_dir} ({summary['seconds']:.0f} s)")


def check_config(config: Any) -> None:
    """A command's config checked before it runs (by a sweep): its own validate(), if it has
    one, and its env id against the Gymnasium registry."""
    if hasattr(config, "validate"):
        config.validate()
    if isinstance(getattr(config, "env", None), str):
        from envs import check_env_id

        check_env_id(config.env)


def run_sweep(config: SweepConfig) -> None:
    """Run a sweep of any other command through `python -m mbrl_bilevel.cli`; exit 1 if a run
    failed."""
    from mbrl_bilevel.sweep.command import run_sweep as run

    sweepable = {name: t for name, (t, _) in COMMANDS.items() if name not in ("sweep", "report")}
    try:
        outcomes, folder = run(config, sweepable, check_config, "mbrl_bilevel.cli", DEFAULTS)
    except KeyboardInterrupt:
        print(
            f"\nsweep interrupted: `mbrl-bilevel sweep {config.spec}` finishes it", file=sys.stderr
        )
        raise SystemExit(130) from None
    if config.report and not config.dry_run and list(folder.glob("*/summary.json")):
        try:
            out, _ = write_report(ReportConfig(runs=(str(folder),)), CONFIG_TYPES)
            print(f"report: {out / 'report.md'}")
        except ConfigError as error:  # runs of a kind report does not read (bench, ...)
            print(f"no report: {error}")
    if any(outcome.returncode != 0 for outcome in outcomes):
        raise SystemExit(1)


COMMANDS: dict[str, tuple[type, Callable[[Any], None]]] = {
    "train": (TrainConfig, run_train),
    "eval": (EvalConfig, run_eval),
    "gaussian": (GaussianConfig, run_gaussian),
    "bench": (BenchConfig, run_bench),
    "tabular": (TabularConfig, run_tabular),
    "collect": (CollectConfig, run_collect),
    "dynamics": (DynamicsConfig, run_dynamics),
    "sweep": (SweepConfig, run_sweep),
    "report": (ReportConfig, lambda config: run_report(config, CONFIG_TYPES)),
}
CONFIG_TYPES = {name: config_type for name, (config_type, _) in COMMANDS.items()}
"""Each command's config dataclass (for the report, which fills in fields old runs lack)."""


DEFAULTS: dict[str, Callable[[list[str]], Any]] = {"train": train_defaults}
"""Commands whose defaults depend on some of their arguments (train: the preset of --env,
--agent and --preset): args -> the default config the arguments are parsed on top of."""


def parse_command(name: str, args: Sequence[str]) -> Any:
    """The config of `mbrl-bilevel <name> <args>`; a usage error is a one-line ConfigError."""
    default = DEFAULTS[name](list(args)) if name in DEFAULTS else None
    return parse_config(COMMANDS[name][0], args, default, prog=f"mbrl-bilevel {name}")


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    keep_freed_memory()
    try:
        if argv and argv[0] in COMMANDS:
            config = parse_command(argv[0], argv[1:])
        else:  # the command list, or tyro's message for an unknown command
            config = tyro.extras.subcommand_cli_from_dict(
                {name: config_type for name, (config_type, _) in COMMANDS.items()},
                prog="mbrl-bilevel",
                description="Model-based RL with dynamics models trained by NLL or by policy "
                "gradient under a bilevel-learned reward.",
                args=argv,
            )
        runner = next(
            run for config_type, run in COMMANDS.values() if isinstance(config, config_type)
        )
        runner(config)
    except ConfigError as error:
        print(f"mbrl-bilevel: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
