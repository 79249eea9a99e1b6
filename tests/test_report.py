"""`mbrl-bilevel report`: one table, curve PNGs and hparams from agent, dynamics, tabular and
Gaussian runs alike (tiny real runs of each command)."""

import json
import shutil

import numpy as np
import pytest
from scipy import stats

from agents.commands import TrainConfig, run_train
from envs import POINT_MASS_ID, make_env
from envs.collect import collect
from mbrl_bilevel.cli import CONFIG_TYPES, main
from mbrl_bilevel.dynamics import DynamicsConfig
from mbrl_bilevel.dynamics import run_study as run_dynamics
from mbrl_bilevel.gaussian import GaussianConfig
from mbrl_bilevel.gaussian import run_study as run_gaussian
from mbrl_bilevel.report.command import ReportConfig, write_report
from mbrl_bilevel.report.runs import read_csv
from mbrl_bilevel.reporting import align_curves, band_half_width, summary_table
from mbrl_bilevel.tabular.study import TabularConfig
from mbrl_bilevel.tabular.study import run_study as run_tabular


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs/: two PointMass agent runs (seeds 0, 1; lam of Gaussian runs 0.5 and 1; one
    tabular and one dynamics run with two seeds each."""
    out = tmp_path_factory.mktemp("runs")
    for seed in (0, 1):
        run_train(
            TrainConfig(
                env=POINT_MASS_ID,
                preset="tiny",
                steps=50,
                eval_every=25,
                eval_episodes=1,
                seed=seed,
                name=f"pm-s{seed}",
                out_dir=str(out),
                progress=False,
            )
        )
    for lam in (0.5, 1.0):
        run_gaussian(
            GaussianConfig(
                lam=lam, steps=20, eval_every=10, seeds=2, jobs=1, name=f"g{lam}", out_dir=str(out)
            )
        )
    run_tabular(
        TabularConfig(
            dataset="iris", methods="nll,pg", steps=10, seeds=2, jobs=1, name="t", out_dir=str(out)
        )
    )
    transitions = collect(make_env(POINT_MASS_ID, seed=0), 100, seed=0)
    dynamics = DynamicsConfig(
        strategies="nll,mse",
        seeds=2,
        steps=20,
        members=2,
        elites=1,
        hidden="16",
        eval_every=10,
        rollouts=2,
        name="d",
        jobs=1,
        out_dir=str(out),
    )
    run_dynamics(dynamics, transitions)
    return out


def test_report_of_every_kind(runs, tmp_path):
    out, text = write_report(ReportConfig(runs=(str(runs),), out=str(tmp_path)), CONFIG_TYPES)
    assert (out / "report.md").read_text() == text
    for command in ("train", "gaussian", "tabular", "dynamics"):
        assert f"## {command} (run folders: " in text
        figures = list(out.glob(f"curves_{command}*.png"))
        assert len(figures) == 1 and figures[0].stat().st_size > 10_000
        assert list((out / "hparams" / command).glob("*/events.out.tfevents.*"))
    numbers = json.loads((out / "numbers.json").read_text())
    # agent runs differ only by seed: one group of two seeds, from the runs' summaries
    returns = [
        json.loads((runs / f"pm-s{s}" / "summary.json").read_text())["final_eval_return"]
        for s in (0, 1)
    ]
    final = numbers["train"]["train"]["final_eval_return"]
    assert final["n"] == 2 and final["mean"] == pytest.approx(np.mean(returns))
    # Gaussian runs differ by lam: groups (lam, method), each over the study's two seeds
    assert set(numbers["gaussian"]) == {
        f"{lam} / {m}" for lam in (0.5, 1.0) for m in ("nll", "pg-star", "pg-identity", "pg-scaled")
    }
    assert "| lam | method | nll |" in text
    assert numbers["tabular"]["iris / pg"]["accuracy"]["n"] == 2
    assert numbers["dynamics"]["mse"]["rmse"]["n"] == 2


def test_hparams_hold_group_values_and_metrics(runs, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out, _ = write_report(
        ReportConfig(runs=(str(runs / "g0.5"), str(runs / "g1.0")), out=str(tmp_path)), CONFIG_TYPES
    )
    sessions = sorted((out / "hparams" / "gaussian").iterdir())
    sessions = [s for s in sessions if s.is_dir()]
    assert len(sessions) == 2 * 4 * 2  # runs × methods × seeds
    events = EventAccumulator(str(sessions[0]))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert start.hparams["lam"].number_value == 0.5
    assert start.hparams["method"].string_value == "nll"
    nll = events.Scalars("hparam/nll")[0].value
    curve = read_csv(runs / "g0.5" / "metrics.csv")
    assert nll == pytest.approx(
        [r for r in curve if r["method"] == "nll" and r["seed"] == 0][-1]["nll"]
    )


def test_a_run_saved_before_a_field_existed_groups_with_its_default(runs, tmp_path):
    old = tmp_path / "old-runs" / "pm-s1"
    shutil.copytree(runs / "pm-s1", old)
    config = json.loads((old / "config.json").read_text())
    assert config["planner"].pop("plan_dtype") == "float32"  # the default, added after the run
    (old / "config.json").write_text(json.dumps(config))
    out, text = write_report(
        ReportConfig(runs=(str(runs / "pm-s0"), str(old)), out=str(tmp_path / "report")),
        CONFIG_TYPES,
    )
    numbers = json.loads((out / "numbers.json").read_text())
    assert list(numbers["train"]) == ["train"] and "plan_dtype" not in text
    assert numbers["train"]["train"]["final_eval_return"]["n"] == 2


@pytest.mark.parametrize(
    "args, message",
    [([], "give at least one run folder"), (["."], "no finished run folders")],
)
def test_report_cli_refuses_no_runs(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["report", *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_summary_table_groups_by_several_keys():
    rows = [
        {"a": a, "b": b, "m": float(a * 10 + s), "seed": s}
        for a in (1, 2)
        for b in "xy"
        for s in (0, 1)
    ]
    header, table, numbers = summary_table(rows, ["a", "b"], ["m"])
    assert header == ["a", "b", "m", "seeds"]
    assert table[0] == ["1", "x", "10.5 ± 0.71", "2"]
    assert numbers["2 / y"]["m"] == {"mean": 20.5, "std": pytest.approx(0.7071, abs=1e-4), "n": 2}


def test_curves_at_different_steps_are_interpolated_onto_the_common_range():
    xs, values = align_curves([{0: 0.0, 10: 10.0, 20: 20.0}, {5: 0.0, 15: 10.0, 25: 20.0}])
    assert xs == [5, 10, 15, 20]
    np.testing.assert_allclose(values, [[5, 10, 15, 20], [0, 5, 10, 15]])


def test_ci95_band_is_the_t_interval_of_the_mean():
    values = np.array([[1.0, 2.0], [3.0, 2.0], [5.0, 2.0]])
    expected = stats.t.ppf(0.975, 2) * 2.0 / np.sqrt(3)
    np.testing.assert_allclose(band_half_width(values, "ci95"), [expected, 0.0])
    np.testing.assert_allclose(band_half_width(values[:1], "ci95"), [0.0, 0.0])
    np.testing.assert_allclose(band_half_width(values, "std"), values.std(0))


def test_an_archived_dynamics_run_without_tensorboard_events_reports_its_finals(runs, tmp_path):
    """results/ keeps no TensorBoard events: the table still comes from metrics.csv."""
    archived = tmp_path / "archive" / "d"
    shutil.copytree(runs / "d", archived, ignore=shutil.ignore_patterns("tb"))
    out, text = write_report(
        ReportConfig(runs=(str(archived),), out=str(tmp_path / "report")), CONFIG_TYPES
    )
    numbers = json.loads((out / "numbers.json").read_text())
    assert numbers["dynamics"]["mse"]["rmse"]["n"] == 2
    assert "## dynamics (run folders: " in text
