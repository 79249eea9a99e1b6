"""Mean ± std tables and learning-curve figures with bands, shared by every study."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1; 0 for a single value)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def significant(value: float, digits: int) -> str:
    """`value` rounded to `digits` significant digits, written without an exponent."""
    return np.format_float_positional(
        value, precision=digits, unique=False, fractional=False, trim="-"
    )


def format_mean_std(values: Sequence[float], digits: int = 4) -> str:
    mean, std = mean_std(values)
    if std <= 1e-9 * max(abs(mean), 1e-300):
        std = 0.0  # float noise of identical values
    return f"{significant(mean, digits)} ± {significant(std, 2)}"


def group_by(
    rows: list[dict[str, Any]], key: str | Sequence[str]
) -> dict[Any, list[dict[str, Any]]]:
    """Rows grouped by the value of `key` (a tuple of values for several keys), groups in
    first-seen order."""
    groups: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[row[key] if isinstance(key, str) else tuple(row[k] for k in key)].append(row)
    return dict(groups)


def summary_table(
    rows: list[dict[str, Any]], group_key: str | Sequence[str], metrics: Sequence[str]
) -> tuple[list[str], list[list[str]], dict[str, dict[str, dict[str, float]]]]:
    """Per group of `group_key` (one column per key): mean ± std of each metric over its rows
    (one row per seed).

    Returns (header, table rows, {group: {metric: {mean, std, n}}}); the group of several keys
    is named by its values joined with " / ".
    """
    keys = [group_key] if isinstance(group_key, str) else list(group_key)
    header = [*keys, *metrics, "seeds"]
    table, numbers = [], {}
    for group, members in group_by(rows, keys).items():
        name = " / ".join(map(str, group))
        numbers[name] = {}
        cells = [str(value) for value in group]
        for metric in metrics:
            values = [m[metric] for m in members if m.get(metric) is not None]
            if values:
                mean, std = mean_std(values)
                numbers[name][metric] = {"mean": mean, "std": std, "n": len(values)}
                cells.append(format_mean_std(values))
            else:
                cells.append("–")
        cells.append(str(len(members)))
        table.append(cells)
    return header, table, numbers


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def plot_curves(
    rows: list[dict[str, Any]],
    x_key: str,
    metrics: Sequence[str],
    group_key: str,
    seed_key: str = "seed",
    titles: Sequence[str] | None = None,
    log_y: Sequence[bool] | None = None,
    band: str = "std",
):
    """One panel per metric: the mean over seeds of each group against `x_key`, with a band of
    ± 1 std (`band="std"`) or the 95% confidence interval of the mean (`"ci95"`, Student t).

    `rows` is long format: one row per (group, seed, x). Seeds recorded at different x are
    interpolated onto the x values they all cover. Returns the matplotlib figure.
    """
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for index, metric in enumerate(metrics):
        ax = axes[0, index]
        for group, members in group_by(rows, group_key).items():
            curves = defaultdict(dict)
            for row in members:
                if row.get(metric) is not None:
                    curves[row[seed_key]][row[x_key]] = row[metric]
            if not curves:
                continue
            xs, values = align_curves(list(curves.values()))
            mean, half = values.mean(0), band_half_width(values, band)
            ax.plot(xs, mean, label=str(group))
            ax.fill_between(xs, mean - half, mean + half, alpha=0.2)
        ax.set_title(titles[index] if titles else metric)
        ax.set_xlabel(x_key)
        values_seen = [row[metric] for row in rows if row.get(metric) is not None]
        if log_y and log_y[index] and values_seen and min(values_seen) > 0:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    figure.tight_layout()
    return figure


def align_curves(curves: list[dict[float, float]]) -> tuple[list[float], np.ndarray]:
    """Curves {x: y} on common x values: every x of any curve inside the range all curves
    cover, each curve linearly interpolated there. Returns (xs, values [S, X])."""
    low, high = max(min(c) for c in curves), min(max(c) for c in curves)
    xs = sorted(x for x in set().union(*curves) if low <= x <= high)
    values = [np.interp(xs, sorted(c), [c[x] for x in sorted(c)]) for c in curves]
    return xs, np.array(values).reshape(len(curves), len(xs))


def band_half_width(values: np.ndarray, band: str) -> np.ndarray:
    """Half width of the band around the mean of `values` [S, X] over S seeds: their std, or
    the Student-t 95% confidence interval of the mean (0 for one seed)."""
    if band == "std":
        return values.std(0)
    if band != "ci95":
        raise ValueError(f"band must be std or ci95, got {band!r}")
    seeds = len(values)
    if seeds < 2:
        return np.zeros(values.shape[1])
    from scipy import stats

    return stats.t.ppf(0.975, seeds - 1) * values.std(0, ddof=1) / np.sqrt(seeds)
