"""The control benchmark's report on agent (train) runs: per (agent, env), each dynamics loss's
final evaluation return and area under its learning curve (mean ± std over seeds), wall seconds
per env step, the model's held-out quality, and the paired-by-seed difference to nll with a 95%
interval; one figure per (agent, env) with ± 1 std bands and the published anchors drawn on the
same axes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.ticker import FuncFormatter

from mbrl_bilevel.configs import env_name
from mbrl_bilevel.report.runs import RunData, read_csv
from mbrl_bilevel.reporting import format_mean_std, markdown_table, plot_curves
from mbrl_bilevel.runs import safe_name, save_figure

BASELINE = "nll"
"""The loss every other one is compared with, seed by seed."""


@dataclass(frozen=True)
class Anchor:
    """A published mean evaluation return (± std where published) at an env step."""

    step: float
    mean: float
    std: float | None = None


@dataclass(frozen=True)
class Anchors:
    """Published points of one (agent, env), with where they come from and how they differ."""

    source: str
    points: tuple[Anchor, ...]


ANCHORS: dict[tuple[str, str], Anchors] = {
    ("mbpo", "Hopper"): Anchors(
        "MBPO's official curve (Janner et al. 2019), Gymnasium v4 re-plot",
        (Anchor(10_000, 329, 118), Anchor(15_000, 459, 152), Anchor(20_000, 530, 157)),
    ),
    ("mbpo", "HalfCheetah"): Anchors(
        "MBPO's official curve (Janner et al. 2019), Gymnasium v4 re-plot",
        (Anchor(10_000, 1720, 269), Anchor(15_000, 3172, 325)),
    ),
    ("pets", "HalfCheetah"): Anchors(
        "PETS (Chua et al. 2018) on its own cheetah variant (reward ẋ − 0.1‖a‖²)",
        (Anchor(10_000, 1000),),
    ),
}


@dataclass(frozen=True)
class RunSummary:
    """One agent run reduced to what the control report compares."""

    agent: str
    env: str
    loss: str
    """The dynamics loss, or "sac" for the model-free baseline."""
    seed: int
    final: float | None
    """The final evaluation's mean return."""
    curve: dict[float, float]
    """Env step -> return: evaluations (MBPO), training episodes (PETS: they act as it
    evaluates, the same planner on the latest model)."""
    seconds_per_step: float | None
    model: list[dict[str, float]]
    """model.csv: step, val_rmse, val_nll at every retraining."""

    @property
    def area(self) -> float | None:
        """Area under the curve divided by its step span: the curve's mean return."""
        if len(self.curve) < 2:
            return None
        steps = sorted(self.curve)
        returns = [self.curve[s] for s in steps]
        return float(np.trapezoid(returns, steps) / (steps[-1] - steps[0]))


def summarise(run: RunData) -> RunSummary:
    config = run.config
    loss = "sac" if config.get("preset") == "sac" else config["dynamics_loss"]
    key = "episode_return" if config["agent"] == "pets" else "eval_return"
    curve = {row["step"]: row[key] for row in run.curves if row.get(key) is not None}
    model_csv = run.folder / "model.csv"
    return RunSummary(
        agent=config["agent"],
        env=env_name(config["env"]),
        loss=loss,
        seed=int(config["seed"]),
        final=run.finals[0].get("final_eval_return"),
        curve=curve,
        seconds_per_step=run.finals[0].get("seconds_per_env_step"),
        model=read_csv(model_csv) if model_csv.is_file() else [],
    )


def paired_difference(
    runs: list[RunSummary], baselines: list[RunSummary], value: str
) -> tuple[float, float, int] | None:
    """Mean of `value` (final or area) minus the baseline's over the seeds both have, the half
    width of its 95% Student-t interval, and the number of pairs; None without two pairs."""
    base = {r.seed: getattr(r, value) for r in baselines}
    diffs = [
        getattr(r, value) - base[r.seed]
        for r in runs
        if base.get(r.seed) is not None and getattr(r, value) is not None
    ]
    if len(diffs) < 2:
        return None
    from scipy import stats

    diffs = np.asarray(diffs, dtype=float)
    half = stats.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / np.sqrt(len(diffs))
    return float(diffs.mean()), float(half), len(diffs)


def _cell(values: list[float | None], digits: int = 4) -> str:
    values = [v for v in values if v is not None]
    return format_mean_std(values, digits) if values else "–"


def _difference_cell(difference: tuple[float, float, int] | None) -> str:
    if difference is None:
        return "–"
    mean, half, _ = difference
    return f"{mean:+.1f} [{mean - half:+.1f}, {mean + half:+.1f}]"


def grouped(runs: list[RunSummary], *fields: str) -> dict[Any, list[RunSummary]]:
    """`runs` by their value of one field (or a tuple of several), in first-seen order."""
    groups: dict[Any, list[RunSummary]] = {}
    for run in runs:
        values = tuple(getattr(run, f) for f in fields)
        groups.setdefault(values[0] if len(fields) == 1 else values, []).append(run)
    return groups


def loss_order(loss: str) -> tuple[int, str]:
    """nll first, the PG family next, sac last."""
    return (0 if loss == BASELINE else 2 if loss == "sac" else 1, loss)


def section(agent: str, env: str, runs: list[RunSummary], out: Path) -> tuple[str, dict]:
    """The markdown section and numbers of one (agent, env); saves its figure."""
    by_loss = dict(sorted(grouped(runs, "loss").items(), key=lambda item: loss_order(item[0])))
    baselines = by_loss.get(BASELINE, [])
    header = ["loss", "seeds", "final return", "area (mean return)"]
    header += [f"final − {BASELINE} [95% CI]", f"area − {BASELINE} [95% CI]"]
    header += ["s / env step", "model val RMSE (last)", "model val NLL/dim (last)"]
    rows, numbers = [], {}
    for loss, members in by_loss.items():
        final = paired_difference(members, baselines, "final") if loss != BASELINE else None
        area = paired_difference(members, baselines, "area") if loss != BASELINE else None
        last = [m.model[-1] for m in members if m.model]
        rows.append(
            [
                loss,
                str(len(members)),
                _cell([m.final for m in members]),
                _cell([m.area for m in members]),
                _difference_cell(final),
                _difference_cell(area),
                _cell([m.seconds_per_step for m in members], 3),
                _cell([row["val_rmse"] for row in last], 3),
                _cell([row["val_nll"] for row in last], 3),
            ]
        )
        numbers[loss] = {
            "seeds": sorted(m.seed for m in members),
            "final": [m.final for m in members],
            "area": [m.area for m in members],
            f"final_minus_{BASELINE}": final,
            f"area_minus_{BASELINE}": area,
        }
    figure_path = out / f"control_{agent}_{safe_name(env)}.png"
    save_figure(control_figure(agent, env, runs), figure_path)
    anchors = ANCHORS.get((agent, env))
    text = f"## {agent.upper()} on {env}\n\n" + markdown_table(header, rows) + "\n\n"
    text += f"![{agent} {env}]({figure_path.name})\n\n"
    curve = "training episodes" if agent == "pets" else "evaluations"
    text += (
        f"Mean ± std over seeds; the curve and its area are the {curve}; intervals are "
        f"paired by seed (Student t). Anchor: {anchors.source}.\n"
        if anchors
        else f"Mean ± std over seeds; the curve and its area are the {curve}; intervals are "
        "paired by seed (Student t). No published anchor on these axes.\n"
    )
    return text, numbers


def control_figure(agent: str, env: str, runs: list[RunSummary]):
    """Returns (mean ± 1 std over seeds) with the published anchors, and the model's held-out
    RMSE at every retraining, against env steps."""
    rows = [
        {"loss": r.loss, "seed": r.seed, "step": step, "return": value}
        for r in runs
        for step, value in r.curve.items()
    ]
    rows += [
        {"loss": r.loss, "seed": r.seed, "step": row["step"], "model val RMSE": row["val_rmse"]}
        for r in runs
        for row in r.model
    ]
    rows.sort(key=lambda row: loss_order(row["loss"]))
    panels = ["return", "model val RMSE"] if any(r.model for r in runs) else ["return"]
    titles = [f"{agent.upper()} {env}: return", "model held-out RMSE (Δ-state units)"]
    figure = plot_curves(rows, "step", panels, "loss", titles=titles)
    for axis in figure.axes:
        axis.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1000:g}k"))
        axis.set_xlabel("env steps")
    last_step = max((step for r in runs for step in r.curve), default=0.0)
    anchors = ANCHORS.get((agent, env))
    points = [a for a in anchors.points if a.step <= last_step] if anchors else []
    if points:
        axis = figure.axes[0]
        errors = [a.std or 0.0 for a in points]
        axis.errorbar(
            [a.step for a in points],
            [a.mean for a in points],
            yerr=errors,
            fmt="ks",
            capsize=3,
            label="published",
        )
        axis.legend(fontsize=8)
    return figure


def control_report(runs: list[RunData], out: Path) -> tuple[str, dict[str, Any]]:
    """The control section of a report on agent runs: one part per (agent, env)."""
    summaries = [summarise(run) for run in runs]
    parts, numbers = [], {}
    for (agent, env), members in grouped(summaries, "agent", "env").items():
        text, numbers[f"{agent}/{env}"] = section(agent, env, members, out)
        parts.append(text)
    return "# Control benchmark\n\n" + "\n".join(parts), numbers
