"""The MBPO acceptance experiment on Hopper-v5: MBPO with nll dynamics, MBPO with bilevel dynamics
and plain SB3 SAC, at one env-step budget, over seeds; then its table and figure.

    python scripts/mbpo_hopper.py run --steps 15000 --seeds 0 1 --jobs 2
    python scripts/mbpo_hopper.py report

`run` starts `mbrl-bilevel train` for every (config, seed), `jobs` at a time, one torch thread
each. A finished run (summary.json) is skipped, a killed one is resumed from its checkpoint, so
the same command continues an interrupted experiment. `report` reads the eval returns from the
TensorBoard events of every run folder (all of them, so resumed runs keep their early points),
prints a markdown table and writes it with the figure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mbrl_bilevel.reporting import markdown_table, plot_curves, summary_table
from mbrl_bilevel.runs import atomic_write_text, save_figure

CONFIGS = {  # name: (preset, dynamics loss)
    "mbpo-nll": ("cpu", "nll"),
    "mbpo-bilevel": ("cpu", "bilevel"),
    "sac": ("sac", "nll"),  # no model: the loss is unused
}


def run_one(out_dir: Path, name: str, seed: int, steps: int, eval_every: int) -> str:
    """Train (or resume, or skip) one run; returns a line for the log."""
    run_dir = out_dir / f"{name}-s{seed}"
    if (run_dir / "summary.json").is_file():
        return f"{run_dir.name}: done already"
    if (run_dir / "config.json").is_file():
        command = ["mbrl-bilevel", "train", "--resume", str(run_dir), "--no-progress"]
    else:
        preset, loss = CONFIGS[name]
        command = ["mbrl-bilevel", "train", "--env", "Hopper-v5", "--agent", "mbpo"]
        command += ["--preset", preset, "--dynamics-loss", loss, "--seed", str(seed)]
        command += ["--steps", str(steps), "--eval-every", str(eval_every), "--eval-episodes", "5"]
        command += ["--checkpoint-every", "500"]
        command += ["--out-dir", str(out_dir), "--name", run_dir.name, "--no-progress"]
    with open(out_dir / f"{run_dir.name}.log", "a") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    return f"{run_dir.name}: exit status {code}"


def run(args) -> None:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(name, seed) for seed in args.seeds for name in args.configs]
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [
            pool.submit(run_one, out_dir, name, seed, args.steps, args.eval_every)
            for name, seed in jobs
        ]
        for future in futures:
            print(future.result(), flush=True)


def eval_curve(run_dir: Path) -> dict[int, float]:
    """{env step: mean eval return} from every TensorBoard events file of the run."""
    curve = {}
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events)).Reload()
        if "eval/mean_reward" in accumulator.Tags()["scalars"]:
            scalars = accumulator.Scalars("eval/mean_reward")
            curve |= {e.step: e.value for e in scalars}
    return curve


def report(args) -> None:
    out_dir = Path(args.out_dir)
    curves, finals = [], []
    for name in args.configs:
        for seed in args.seeds:
            run_dir = out_dir / f"{name}-s{seed}"
            curve = eval_curve(run_dir)
            if not curve:
                print(f"{run_dir}: no evaluations yet", file=sys.stderr)
                continue
            curves += [
                {"config": name, "seed": seed, "step": s, "eval return": r}
                for s, r in sorted(curve.items())
            ]
            last = sorted(curve)[-3:]
            summary_path = run_dir / "summary.json"
            summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
            finals.append(
                {
                    "config": name,
                    "env steps": summary.get("env_steps", max(curve)),
                    "final eval return": curve[max(curve)],
                    "mean of last 3 evals": sum(curve[s] for s in last) / len(last),
                    "ms per env step": 1e3 * summary["seconds_per_env_step"] if summary else None,
                }
            )
    if not finals:
        raise SystemExit(f"no run in {out_dir} has evaluations")
    metrics = ["env steps", "final eval return", "mean of last 3 evals", "ms per env step"]
    header, rows, _ = summary_table(finals, "config", metrics)
    table = markdown_table(header, rows)
    print(table)
    atomic_write_text(out_dir / "table.md", table + "\n")
    figure = plot_curves(curves, "step", ["eval return"], "config", titles=["Hopper-v5"])
    save_figure(figure, Path(args.figure))
    print(f"figure: {args.figure}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["run", "report"])
    parser.add_argument("--steps", type=int, default=15_000, help="env steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one core each)")
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--out-dir", default="runs/mbpo-hopper")
    parser.add_argument("--figure", default="docs/figures/mbpo_hopper.png")
    args = parser.parse_args()
    if args.command == "run":
        run(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
