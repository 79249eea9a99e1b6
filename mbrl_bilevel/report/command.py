"""`mbrl-bilevel report RUNS...`: one markdown table (mean ± std per group), learning-curve PNGs
with confidence bands and a TensorBoard hparams table, from finished runs of any kind."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tyro

from mbrl_bilevel.report.control import control_report
from mbrl_bilevel.report.runs import KINDS, RunData, find_runs, load_run
from mbrl_bilevel.reporting import group_by, markdown_table, plot_curves, summary_table
from mbrl_bilevel.runs import atomic_write_text, safe_name, save_figure, write_json

NOT_A_GROUP = {"seed", "name", "out_dir", "resume", "progress", "threads", "jobs"}
"""Config fields that never define a group: seeds are what groups average over."""


@dataclass(frozen=True)
class ReportConfig:
    """Report finished runs: a table of mean ± std per group, learning curves, hparams."""

    runs: tyro.conf.Positional[tuple[str, ...]]
    """Run folders, or folders of runs (a sweep folder runs/<sweep>)."""
    out: str | None = None
    """Output folder; default <folder>/report for one folder of runs, else runs/report-<time>."""
    band: Literal["ci95", "std"] = "ci95"
    """Curve bands: the 95% confidence interval of the mean over seeds (t), or ± 1 std."""


def varying_fields(runs: list[RunData]) -> list[str]:
    """Config fields whose values differ between `runs` (seeds and bookkeeping excluded)."""
    fields = dict.fromkeys(f for run in runs for f in run.config if f not in NOT_A_GROUP)
    return [
        f for f in fields if len({json.dumps(run.config.get(f), default=str) for run in runs}) > 1
    ]


def grouped_rows(
    runs: list[RunData], attribute: str, keys: list[str], shown: list[str] | None = None
) -> list[dict[str, Any]]:
    """The final or curve rows of `runs` with their run's values of `keys`, a "group" label
    (of the keys `shown`, default all) and a "member" (run folder and seed) that tells seeds of
    one group apart."""
    rows = []
    for run in runs:
        for row in getattr(run, attribute):
            row = {**{k: run.config.get(k) for k in keys}, **row}
            row["group"] = label(row, keys if shown is None else shown) or run.command
            row["member"] = f"{run.folder.name}/{row['seed']}"
            rows.append(row)
    return rows


def label(row: dict[str, Any], keys: list[str]) -> str:
    return ", ".join(f"{k}={row[k]}" for k in keys)


def plot_kind(runs: list[RunData], keys: list[str], out: Path, band: str) -> list[Path]:
    """Learning curves of runs of one command, one PNG per value of its facet (env, dataset)
    when that is a group key; returns the PNG paths."""
    command, kind = runs[0].command, KINDS[runs[0].command]
    facet = kind.facet if kind.facet in keys else None
    curves = grouped_rows(runs, "curves", keys, [k for k in keys if k != facet])
    panels = [m for m in kind.curves if any(row.get(m) is not None for row in curves)]
    if not panels:
        return []
    paths = []
    for value, rows in (group_by(curves, facet) if facet else {None: curves}).items():
        path = out / f"curves_{command}{'' if facet is None else '_' + safe_name(value)}.png"
        titles = [m if facet is None else f"{value}: {m}" for m in panels]
        figure = plot_curves(rows, "step", panels, "group", "member", titles, band=band)
        save_figure(figure, path)
        paths.append(path)
    return paths


def report_kind(runs: list[RunData], out: Path, band: str) -> tuple[str, dict[str, Any]]:
    """The table section and numbers of runs of one command; saves its curves and hparams."""
    command, kind = runs[0].command, KINDS[runs[0].command]
    keys = list(dict.fromkeys([*varying_fields(runs), *kind.groups]))
    finals = grouped_rows(runs, "finals", keys)
    metrics = [m for m in kind.metrics if any(row.get(m) is not None for row in finals)]
    header, table, numbers = summary_table(finals, keys or ["group"], metrics)
    figures = plot_kind(runs, keys, out, band)
    write_hparams(out / "hparams" / command, finals, keys, metrics)
    band_text = "95% confidence interval of the mean" if band == "ci95" else "± 1 std"
    text = f"## {command} (run folders: {len(runs)}), mean ± std over seeds\n\n"
    text += markdown_table(header, table) + "\n\n"
    text += "".join(f"![{command} learning curves]({path.name})\n\n" for path in figures)
    if figures:
        text += f"Curves: mean over seeds, band: {band_text}.\n"
    return text, numbers


def write_hparams(folder: Path, finals: list[dict], keys: list[str], metrics: list[str]) -> None:
    """One TensorBoard hparams row per final row: its group values and seed, its metrics."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(folder)) as writer:
        for index, row in enumerate(finals):
            hparams = {k: _hparam(row[k]) for k in keys} | {"seed": _hparam(row["seed"])}
            values = {f"hparam/{m}": float(row[m]) for m in metrics if row.get(m) is not None}
            name = f"{index:03d} {row['group']}, seed={row['seed']:g}".replace("/", "_")
            writer.add_hparams(hparams, values, run_name=name)


def _hparam(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool)) else str(value)


def default_out(paths: tuple[str, ...]) -> Path:
    if len(paths) == 1 and not (Path(paths[0]) / "summary.json").is_file():
        return Path(paths[0]) / "report"
    return Path("runs") / f"report-{time.strftime('%Y%m%d-%H%M%S')}"


def write_report(config: ReportConfig, config_types: dict[str, type]) -> tuple[Path, str]:
    """Read the runs, write report.md, numbers.json, curves_<command>.png, hparams/ and, for
    agent runs, the control benchmark's section and control_<agent>_<env>.png to the output
    folder; returns (output folder, markdown text). `config_types` maps commands to their config
    dataclasses (cli.CONFIG_TYPES)."""
    runs = [load_run(folder, config_types) for folder in find_runs(list(config.runs))]
    out = Path(config.out) if config.out else default_out(config.runs)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "hparams", ignore_errors=True)  # a report replaces the last one
    for old in [*out.glob("curves_*.png"), *out.glob("control_*.png")]:
        old.unlink()
    by_command: dict[str, list[RunData]] = {}
    for run in runs:
        by_command.setdefault(run.command, []).append(run)
    sections, numbers = [], {}
    for command, members in by_command.items():
        text, numbers[command] = report_kind(members, out, config.band)
        sections.append(text)
    if "train" in by_command:
        text, numbers["control"] = control_report(by_command["train"], out)
        sections.append(text)
    text = "\n".join(sections)
    atomic_write_text(out / "report.md", text)
    write_json(out / "numbers.json", numbers)
    return out, text


def run_report(config: ReportConfig, config_types: dict[str, type]) -> None:
    out, text = write_report(config, config_types)
    print(text)
    print(
        f"report: {out / 'report.md'}\nTensorBoard hparams: tensorboard --logdir {out / 'hparams'}"
    )
