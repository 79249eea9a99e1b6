"""`mbrl-bilevel bench plan`: FLOP counting of one planning step and the command's report."""

import json

import pytest

from agents.pets import PRESETS
from mbrl_bilevel.cli import main
from mbrl_bilevel.train_bench import linear_flops_per_row


def icem_candidates_per_step(config) -> int:
    """Candidates of one warm iCEM step: the decaying populations, the kept elites carried into
    every iteration (from the previous step on the first), and the mean on the last."""
    population, total = config.population, 0
    kept = int(0.3 * config.elites)
    for _ in range(config.iterations):
        total += population + kept
        population = int(population / 1.25)
    return total + 1


def test_bench_plan_counts_the_model_flops_and_reports_ratios(tmp_path, capsys):
    main(
        ["bench", "plan", "--plan.presets", "tiny", "--plan.steps", "2", "--out-dir", str(tmp_path)]
        + ["--name", "plan", "--plan.obs-dim", "9", "--plan.action-dim", "2", "--plan.threads", "1"]
    )
    row = json.loads((tmp_path / "plan" / "summary.json").read_text())["rows"][0]
    tiny = PRESETS["tiny"]
    planner = tiny.planner
    rows = icem_candidates_per_step(planner) * planner.particles * planner.horizon
    assert row["model_gflop"] == pytest.approx(
        rows * linear_flops_per_row(11, 9, tiny.model.hidden) / 1e9
    )
    assert row["ratio"] == pytest.approx(row["ms_per_step"] / row["bound_ms"])
    assert row["ratio"] > 1.0 and row["dtype"] == "float32"
    assert "| tiny | float32 |" in capsys.readouterr().out


def test_bench_plan_refuses_unknown_presets_and_dtypes(tmp_path):
    for option, value in (("--plan.presets", "huge"), ("--plan.dtypes", "float16")):
        with pytest.raises(SystemExit) as exit_info:
            main(["bench", "plan", option, value, "--out-dir", str(tmp_path)])
        assert exit_info.value.code == 2
