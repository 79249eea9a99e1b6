"""scripts/dynamics_tables.py: pairing by dataset and seed, labels, unfinished references."""

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "dynamics_tables.py"


@pytest.fixture(scope="module")
def tables():
    spec = importlib.util.spec_from_file_location("dynamics_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(
    sweep: Path, dataset: str, strategy: str, values, estimator="score", beta=0.5, **options
):
    """A finished run folder: config.json and metrics.csv with (rmse, nll) per seed."""
    run = sweep / f"{dataset},{strategy},{estimator},{beta},{options}"
    run.mkdir(parents=True)
    config = {"dataset": f"data/{dataset}.npz", "estimator": estimator, "beta": beta} | options
    (run / "config.json").write_text(json.dumps(config))
    rows = [
        {"strategy": strategy, "seed": seed, "rmse": rmse, "nll": nll}
        for seed, (rmse, nll) in enumerate(values)
    ]
    metrics = pd.DataFrame(rows).assign(cal1=0.7, cal2=0.95, rollout_rmse=1.0)
    metrics.to_csv(run / "metrics.csv", index=False)


def test_ratios_and_gaps_are_paired_by_dataset_and_seed(tables, tmp_path):
    write_run(tmp_path, "a-random", "mse", [(1.0, 0.0), (2.0, 0.0)])
    write_run(tmp_path, "a-random", "nll", [(3.0, -1.0), (3.0, -2.0)])
    write_run(tmp_path, "a-random", "pg-plugin-input-beta", [(1.5, -1.5), (2.0, -1.0)], "pathwise")
    write_run(tmp_path, "b-medium", "mse", [(10.0, 5.0)])
    write_run(tmp_path, "b-medium", "pg-plugin-input-beta", [(20.0, 0.0)], beta=1.0)

    rows = (
        tables.paired(tables.load(tmp_path)).set_index(["dataset", "strategy", "seed"]).sort_index()
    )

    pg = rows.loc[("a-random", "pg-plugin-input-beta (pathwise)")]
    assert pg["ratio"].tolist() == [1.5, 1.0]
    assert pg["gap"].tolist() == [-0.5, 1.0]
    weighted = rows.loc[("b-medium", "pg-plugin-input-beta β = 1")]
    assert weighted["ratio"].tolist() == [2.0]
    assert weighted["gap"].isna().all()  # no nll run on b-medium yet


def test_summary_shows_a_dash_where_a_strategy_or_reference_is_missing(tables, tmp_path):
    write_run(tmp_path, "a-random", "mse", [(1.0, 0.0), (2.0, 0.0)])
    write_run(tmp_path, "a-random", "nll", [(3.0, -1.0), (3.0, -2.0)])
    write_run(tmp_path, "b-medium", "mse", [(10.0, 5.0), (10.0, 5.0)])

    lines = tables.summary_table(tables.load(tmp_path)).splitlines()

    assert lines[2] == "| mse | 1.00 ± 0.00 | 1.50 ± 0.71 | 1.00 ± 0.00 | – |"
    assert lines[3] == "| nll | 2.25 ± 1.06 | 0.00 ± 0.00 | – | – |"


def test_calibrated_runs_get_a_variance_scale_column(tables, tmp_path):
    write_run(tmp_path, "a-random", "mse", [(1.0, 0.0), (2.0, 0.0)])
    write_run(tmp_path, "a-random", "nll", [(3.0, -1.0), (3.0, -2.0)])
    plain = tables.dataset_table(tables.load(tmp_path)).splitlines()
    assert "variance scale" not in plain[0] and plain[1].count("|---") == 9

    metrics = next(tmp_path.glob("*nll*/metrics.csv"))
    pd.read_csv(metrics).assign(variance_scale=[0.5, 0.7]).to_csv(metrics, index=False)
    lines = tables.dataset_table(tables.load(tmp_path)).splitlines()
    assert lines[0].endswith("| nll − nll(nll) | variance scale | seeds |")
    assert lines[1].count("|---") == 10
    assert lines[3].endswith("| 0.60 ± 0.14 | 2 |")  # nll; mse's row shows "–"
    assert lines[2].endswith("| – | 2 |")


def test_beta_weighted_pg_without_its_variance_phase_is_labelled(tables, tmp_path):
    for phase in (True, False):
        write_run(tmp_path, "a", "pg-plugin-input-beta", [(1.0, 0.0)], variance_phase=phase)
    labels = set(tables.load(tmp_path)["strategy"])
    assert labels == {"pg-plugin-input-beta", "pg-plugin-input-beta without variance phase"}
