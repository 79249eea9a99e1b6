"""The control benchmark's report: areas, paired intervals against nll, anchors on the figure,
read from run folders as `mbrl-bilevel train` writes them."""

import json

import numpy as np
import pytest
from scipy import stats

from mbrl_bilevel.cli import CONFIG_TYPES
from mbrl_bilevel.report.command import ReportConfig, write_report
from mbrl_bilevel.report.control import RunSummary, paired_difference


def summary(seed, final, curve=None, loss="pg-plugin-input-beta"):
    return RunSummary("mbpo", "Hopper", loss, seed, final, curve or {}, 0.1, [])


def test_area_is_the_mean_return_under_the_trapezoid_curve():
    assert summary(0, 0.0, {1000: 0.0, 2000: 10.0, 4000: 10.0}).area == pytest.approx(
        (5.0 * 1000 + 10.0 * 2000) / 3000
    )
    assert summary(0, 0.0, {1000: 3.0}).area is None


def test_paired_difference_is_the_t_interval_of_the_per_seed_differences():
    nll = [summary(s, f, loss="nll") for s, f in enumerate([10.0, 20.0, 30.0, 40.0])]
    pg = [summary(s, f) for s, f in enumerate([11.0, 22.0, 33.0])]  # seed 3 missing: 3 pairs
    mean, half, pairs = paired_difference(pg, nll, "final")
    assert pairs == 3 and mean == pytest.approx(2.0)
    assert half == pytest.approx(stats.t.ppf(0.975, 2) * 1.0 / np.sqrt(3))
    assert paired_difference(pg[:1], nll, "final") is None


def write_run(folder, agent, env, loss, seed, returns, preset="cpu"):
    """A finished train run folder with evaluations every 1000 steps (MBPO) or episodes (PETS)."""
    folder.mkdir(parents=True)
    config = {"env": env, "agent": agent, "dynamics_loss": loss, "preset": preset, "seed": seed}
    (folder / "config.json").write_text(json.dumps(config))
    steps = [1000 * (i + 1) for i in range(len(returns))]
    summary = {"command": "train", "final_eval_return": returns[-1], "seconds_per_env_step": 0.2}
    (folder / "summary.json").write_text(json.dumps(summary))
    rows = "\n".join(
        f"{i},{s},{r},train,{seed}" for i, (s, r) in enumerate(zip(steps, returns, strict=True))
    )
    (folder / "metrics.csv").write_text("episode,step,return,run,seed\n" + rows + "\n")
    (folder / "eval").mkdir()
    np.savez(
        folder / "eval" / "evaluations.npz",
        timesteps=np.array(steps),
        results=np.array(returns, dtype=float)[:, None] + np.zeros((1, 2)),
        ep_lengths=np.ones((len(steps), 2)),
    )
    if preset != "sac":
        (folder / "model.csv").write_text("step,val_rmse,val_nll\n1000,0.5,-1.0\n2000,0.4,-2.0\n")


def test_report_of_agent_runs_has_the_control_section_and_figure(tmp_path):
    runs = tmp_path / "runs"
    for seed in (0, 1, 2):
        write_run(runs / f"n{seed}", "mbpo", "Hopper-v5", "nll", seed, [100, 200, 300 + seed])
        write_run(
            runs / f"p{seed}",
            "mbpo",
            "Hopper-v5",
            "pg-plugin-input-beta",
            seed,
            [150, 250, 310 + 2 * seed],
        )
        write_run(runs / f"s{seed}", "mbpo", "Hopper-v5", "nll", seed, [90, 95, 99], preset="sac")
        write_run(runs / f"c{seed}", "pets", "HalfCheetah-v5", "nll", seed, [-50, 100])
    out, text = write_report(
        ReportConfig(runs=(str(runs),), out=str(tmp_path / "report")), CONFIG_TYPES
    )
    assert "## MBPO on Hopper" in text and "## PETS on HalfCheetah" in text
    assert (out / "control_mbpo_Hopper.png").is_file()
    assert (out / "control_pets_HalfCheetah.png").is_file()
    numbers = json.loads((out / "numbers.json").read_text())["control"]
    pg = numbers["mbpo/Hopper"]["pg-plugin-input-beta"]
    mean, half, pairs = pg["final_minus_nll"]
    assert pairs == 3 and mean == pytest.approx(np.mean([10, 11, 12]))
    assert numbers["mbpo/Hopper"]["sac"]["seeds"] == [0, 1, 2]
    assert numbers["mbpo/Hopper"]["nll"]["area"] == pytest.approx([200.0, 200.25, 200.5])
    row = next(line for line in text.splitlines() if line.startswith("| pg-plugin-input-beta"))
    assert "+11.0 [" in row and "0.4 ± 0" in row  # the paired difference and last model RMSE
