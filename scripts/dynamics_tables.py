"""Per-dataset tables of a dynamics sweep (experiments/dynamics-benchmark.toml) with issue 5's
acceptance columns: each strategy's test RMSE relative to MSE training's and its test NLL minus
NLL training's, paired by seed (a seed fixes the split), mean ± std over the seeds.

    python scripts/dynamics_tables.py runs/dynamics-benchmark            # one table per dataset
    python scripts/dynamics_tables.py runs/dynamics-benchmark --summary  # one row per strategy

A strategy meets the bar where rmse/mse <= 1.05 and nll - nll(nll) <= 0.1 (nats per dimension).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from mbrl_bilevel.learners import DYNAMICS_LOSSES


def load(sweep: Path) -> pd.DataFrame:
    """Every finished run's metrics.csv rows with its dataset name and estimator."""
    frames = []
    for metrics in sorted(sweep.glob("*/metrics.csv")):
        config = json.loads((metrics.parent / "config.json").read_text())
        frame = pd.read_csv(metrics)
        frame["dataset"] = Path(config["dataset"]).stem
        estimator = config["estimator"]
        pg = frame["strategy"].str.startswith(("pg", "bilevel"))
        frame.loc[pg & (estimator != "score"), "strategy"] += f" ({estimator})"
        frames.append(frame)
    rows = pd.concat(frames, ignore_index=True)
    order = rows["strategy"].map(lambda s: (DYNAMICS_LOSSES.index(s.split(" ")[0]), s))
    return rows.iloc[order.argsort(kind="stable")]


def cell(values: pd.Series, digits: int = 3) -> str:
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def dataset_table(rows: pd.DataFrame) -> str:
    """Markdown: strategy, rmse, nll, cal1, cal2, rollout_rmse, rmse/mse, nll - nll(nll), seeds."""
    rows = paired(rows)
    lines = [
        "| strategy | rmse | nll | cal1 | cal2 | rollout_rmse | rmse / mse | nll − nll(nll) "
        "| seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for strategy, group in rows.groupby("strategy", sort=False):
        digits = 4 if group["rmse"].mean() < 0.1 else 3
        columns = [cell(group[c], digits) for c in ("rmse", "nll", "cal1", "cal2")]
        columns += [cell(group["rollout_rmse"], digits), cell(group["ratio"]), cell(group["gap"])]
        lines.append(f"| {strategy} | {' | '.join(columns)} | {len(group)} |")
    return "\n".join(lines)


def paired(rows: pd.DataFrame) -> pd.DataFrame:
    """Per row: rmse / mse's and nll - nll's on the same dataset and seed."""
    keys = ["dataset", "seed"]
    reference = rows.set_index(["strategy", *keys])
    mse, nll = reference.loc["mse"], reference.loc["nll"]
    index = pd.MultiIndex.from_frame(rows[keys])
    return rows.assign(
        ratio=rows["rmse"].to_numpy() / mse["rmse"].reindex(index).to_numpy(),
        gap=rows["nll"].to_numpy() - nll["nll"].reindex(index).to_numpy(),
    )


def summary_table(rows: pd.DataFrame) -> str:
    """Markdown: one row per strategy, per dataset its rmse / mse and nll - nll(nll)."""
    rows = paired(rows)
    datasets = list(dict.fromkeys(rows["dataset"]))
    header = " | ".join(f"{d}: rmse / mse | {d}: nll − nll(nll)" for d in datasets)
    lines = [f"| strategy | {header} |", "|---" * (1 + 2 * len(datasets)) + "|"]
    for strategy, group in rows.groupby("strategy", sort=False):
        cells = []
        for dataset in datasets:
            part = group[group["dataset"] == dataset]
            cells += [cell(part["ratio"], 2), cell(part["gap"], 2)] if len(part) else ["–", "–"]
        lines.append(f"| {strategy} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path, help="the sweep folder, e.g. runs/dynamics-benchmark")
    parser.add_argument("--summary", action="store_true", help="one row per strategy instead")
    args = parser.parse_args()
    rows = load(args.sweep)
    if args.summary:
        print(summary_table(rows))
        return
    for dataset, group in rows.groupby("dataset", sort=False):
        print(f"\n### {dataset}\n\n{dataset_table(group)}")


if __name__ == "__main__":
    main()
