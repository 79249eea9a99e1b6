"""Per-dataset tables of a dynamics sweep (experiments/dynamics-benchmark.toml) with issue 5's
acceptance columns: each strategy's test RMSE relative to MSE training's and its test NLL minus
NLL training's, paired by seed (a seed fixes the split), mean ± std over the seeds.

    python scripts/dynamics_tables.py runs/dynamics-benchmark            # one table per dataset
    python scripts/dynamics_tables.py runs/dynamics-benchmark --summary  # one row per strategy
    python scripts/dynamics_tables.py runs/dynamics-benchmark --figure docs/figures/bar.png

A strategy meets the bar where rmse/mse <= 1.05 and nll - nll(nll) <= 0.1 (nats per dimension).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from mbrl_bilevel.dynamics import DynamicsConfig
from mbrl_bilevel.learners import DYNAMICS_LOSSES, resolve_estimator

BETA_DEFAULT = DynamicsConfig.beta


def load(sweep: Path) -> pd.DataFrame:
    """Every finished run's metrics.csv rows with its dataset name; the strategy is labelled with
    its estimator when not the score function, with β when not the default, and β-weighted PG
    without its variance phase (which holds the mean phase too) or its mean phase as such."""
    frames = []
    for metrics in sorted(sweep.glob("*/metrics.csv")):
        config = json.loads((metrics.parent / "config.json").read_text())
        frame = pd.read_csv(metrics)
        frame["dataset"] = Path(config["dataset"]).stem
        pg = frame["strategy"].str.startswith(("pg", "bilevel"))
        weighted = frame["strategy"].str.endswith("beta")
        frame.loc[pg, "strategy"] = [
            labelled(strategy, resolve_estimator(strategy, config["estimator"]))
            for strategy in frame.loc[pg, "strategy"]
        ]
        if config["beta"] != BETA_DEFAULT:
            frame.loc[weighted, "strategy"] += f" β = {config['beta']:g}"
        phases = frame["strategy"].str.startswith("pg-plugin-input-beta")
        if not config.get("variance_phase", True):
            frame.loc[phases, "strategy"] += " without variance phase"
        elif not config.get("mean_phase", True):
            frame.loc[phases, "strategy"] += " without mean phase"
        frames.append(frame)
    rows = pd.concat(frames, ignore_index=True)
    rows = rows.iloc[rows["dataset"].map(dataset_order).argsort(kind="stable")]
    order = rows["strategy"].map(lambda s: (DYNAMICS_LOSSES.index(s.split(" ")[0]), s))
    return rows.iloc[order.argsort(kind="stable")]


def labelled(strategy: str, estimator: str) -> str:
    """The strategy's name, with its estimator when that is not the score function."""
    return strategy if estimator == "score" else f"{strategy} ({estimator})"


def dataset_order(name: str) -> tuple[str, bool, str]:
    """Environment first, then random before other datasets of it."""
    return name.split("-")[0], "random" not in name, name


def cell(values: pd.Series, digits: int = 3) -> str:
    if values.isna().all():
        return "–"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def dataset_table(rows: pd.DataFrame) -> str:
    """Markdown: strategy, rmse, nll, cal1, cal2, rollout_rmse, rmse/mse, nll - nll(nll), the
    geometric mean of the variance factors when the runs were calibrated (--calibrate), seeds."""
    rows = paired(rows)
    calibrated = "variance_scale" in rows and (rows["variance_scale"].fillna(1) != 1).any()
    names = ["rmse", "nll", "cal1", "cal2", "rollout_rmse", "rmse / mse", "nll − nll(nll)"]
    names += ["variance scale"] if calibrated else []
    lines = [f"| strategy | {' | '.join(names)} | seeds |", "|---" * (len(names) + 2) + "|"]
    for strategy, group in rows.groupby("strategy", sort=False):
        digits = 4 if group["rmse"].mean() < 0.1 else 3
        columns = [cell(group[c], digits) for c in ("rmse", "nll", "cal1", "cal2", "rollout_rmse")]
        columns += [cell(group["ratio"]), cell(group["gap"])]
        columns += [cell(group["variance_scale"], 2)] if calibrated else []
        lines.append(f"| {strategy} | {' | '.join(columns)} | {len(group)} |")
    return "\n".join(lines)


def paired(rows: pd.DataFrame) -> pd.DataFrame:
    """Per row: rmse / mse's and nll - nll's on the same dataset and seed (NaN where that run has
    not finished)."""
    keys = ["dataset", "seed"]
    index = pd.MultiIndex.from_frame(rows[keys])

    def reference(strategy: str, metric: str):
        part = rows[rows["strategy"] == strategy].set_index(keys)[metric]
        return part.reindex(index).to_numpy()

    return rows.assign(
        ratio=rows["rmse"].to_numpy() / reference("mse", "rmse"),
        gap=rows["nll"].to_numpy() - reference("nll", "nll"),
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


def bar_figure(rows: pd.DataFrame, path: Path, limits: tuple[float, float, float, float]) -> None:
    """One panel per dataset: each strategy's nll - nll(nll) against rmse / mse (mean ± std over
    seeds), with the issue's bar (rmse / mse <= 1.05, gap <= 0.1) as dashed lines. The axes keep
    `limits` (x0, x1, y0, y1) so the bar's corner stays readable; a strategy beyond them is
    drawn as an arrow at the edge, labelled with its values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.lines
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = paired(rows)
    datasets = list(dict.fromkeys(rows["dataset"]))
    strategies = list(dict.fromkeys(rows["strategy"]))
    colours = plt.get_cmap("tab20")
    x0, x1, y0, y1 = limits
    figure, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 4.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        ax.axvline(1.05, color="green", ls="--", lw=1)
        ax.axhline(0.1, color="green", ls="--", lw=1)
        for index, strategy in enumerate(strategies):
            part = rows[(rows["dataset"] == dataset) & (rows["strategy"] == strategy)]
            if not len(part):
                continue
            x, y = part["ratio"].mean(), part["gap"].mean()
            style = {"color": colours(index)}
            if x0 <= x <= x1 and y0 <= y <= y1:
                xerr, yerr = part["ratio"].std(ddof=1), part["gap"].std(ddof=1)
                ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", **style)
                continue
            marker = ">" if x > x1 else "^" if y > y1 else "o"
            edge = (min(max(x, x0), x1), min(max(y, y0), y1))
            ax.plot(*edge, marker=marker, ls="none", **style)
            ax.annotate(
                f"{x:.2f}×, {y:+.2f}",
                edge,
                fontsize=6,
                ha="right",
                xytext=(-4, -8),
                textcoords="offset points",
                color=colours(index),
            )
        ax.set(
            title=dataset,
            xlabel="test rmse / mse's (log scale)",
            xscale="log",
            xlim=(x0 * 0.97, x1 * 1.03),
            ylim=(y0 - 0.05, y1 + 0.05),
        )
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks([t for t in (0.9, 1, 1.2, 1.5, 2, 3) if x0 <= t <= x1])
        ax.axhline(0, color="grey", lw=0.5)
    axes[0][0].set_ylabel("test nll − nll training's (nats/dim)")
    bar = matplotlib.lines.Line2D([], [], color="green", ls="--", lw=1)
    handles = [bar] + [
        matplotlib.lines.Line2D([], [], color=colours(i), marker="o", ls="none")
        for i in range(len(strategies))
    ]
    labels = ["the bar: below and left", *strategies]
    figure.legend(handles, labels, loc="center left", bbox_to_anchor=(1, 0.5), fontsize=8)
    figure.tight_layout()
    figure.savefig(path, bbox_inches="tight", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path, help="the sweep folder, e.g. runs/dynamics-benchmark")
    parser.add_argument("--summary", action="store_true", help="one row per strategy instead")
    parser.add_argument("--figure", type=Path, help="also save the rmse/nll scatter there")
    parser.add_argument(
        "--limits",
        type=float,
        nargs=4,
        default=(0.85, 3.6, -0.35, 2.8),
        metavar=("X0", "X1", "Y0", "Y1"),
        help="the figure's axes: rmse / mse from X0 to X1, nll gap from Y0 to Y1",
    )
    args = parser.parse_args()
    rows = load(args.sweep)
    if args.figure:
        bar_figure(rows, args.figure, args.limits)
    if args.summary:
        print(summary_table(rows))
        return
    for dataset, group in rows.groupby("dataset", sort=False):
        print(f"\n### {dataset}\n\n{dataset_table(group)}")


if __name__ == "__main__":
    main()
