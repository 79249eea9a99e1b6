"""`mbrl-bilevel train`'s option groups: every agent field settable on top of a per-env preset,
recorded in config.json, sweepable, and refused with one line when bad."""

import json
import subprocess
import sys

import pytest

from agents.commands import TrainConfig, train_defaults
from agents.mbpo import MBPO
from agents.pets import PETS
from envs.make import make_env
from envs.point_mass import POINT_MASS_ID
from mbrl_bilevel.cli import main


def test_estimator_and_sac_field_from_the_command_line_reach_config_json(tmp_path):
    args = ["--env", "Hopper-v5", "--agent", "mbpo", "--preset", "cpu"]
    args += ["--dynamics-loss", "pg-plugin-input-beta"]
    args += ["--pg.estimator", "score", "--mbpo.updates-per-step", "7", "--mbpo.tau", "0.01"]
    args += ["--steps", "5", "--eval-every", "5", "--eval-episodes", "1"]
    main(["train", *args, "--out-dir", str(tmp_path), "--name", "run", "--no-progress"])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["pg"]["estimator"] == "score"
    assert saved["mbpo"]["updates_per_step"] == 7 and saved["mbpo"]["tau"] == 0.01
    assert saved["mbpo"]["target_entropy"] == -1.0  # the rest of Hopper's cpu preset
    assert saved["model"]["hidden"] == [200, 200, 200] and "planner" not in saved


def test_each_env_gets_its_own_mbpo_settings():
    hopper = train_defaults(["--env", "Hopper-v5", "--agent", "mbpo", "--preset", "cpu"])
    cheetah = train_defaults(["--env", "HalfCheetah-v5", "--agent", "mbpo", "--preset", "cpu"])
    assert hopper.mbpo.rollout_schedule == (20_000, 150_000, 1, 15)
    assert cheetah.mbpo.rollout_schedule == (20_000, 150_000, 1, 1)
    assert (hopper.mbpo.target_entropy, cheetah.mbpo.target_entropy) == (-1.0, -3.0)
    paper = MBPO.preset("mbpo", "HalfCheetah-v5").mbpo
    assert paper.updates_per_step == 40 and cheetah.mbpo.updates_per_step == 20
    agent = MBPO(make_env("HalfCheetah-v5"), config="cpu")
    assert agent.config.mbpo.rollout_schedule == (20_000, 150_000, 1, 1)
    assert agent.sac.target_entropy == -3.0
    assert PETS.preset("pets", "Pusher-v5").planner.horizon == 25
    assert PETS.preset("pets", "HalfCheetah-v5").planner.horizon == 30


def test_the_auto_preset_fits_the_env():
    cheetah = train_defaults(["--env", "HalfCheetah-v5", "--agent", "mbpo"])
    assert cheetah.preset == "cpu" and cheetah.mbpo.rollout_schedule == (20_000, 150_000, 1, 1)
    assert train_defaults([]).preset == "tiny"  # the main job: PETS on InvertedPendulum
    assert main_config(["--env", POINT_MASS_ID, "--preset", "auto"]).preset == "tiny"
    assert TrainConfig(env="Hopper-v5", agent="mbpo").preset == "cpu"


def test_options_change_the_preset_field_by_field():
    args = ["--agent", "pets", "--preset", "cpu", "--planner.horizon", "9", "--model.members", "6"]
    config = main_config(args)
    assert config.planner.horizon == 9 and config.planner.population == 100  # cpu's, kept
    assert config.model.members == 6 and config.model.hidden == (200, 200, 200)
    assert config.agent_config().planner == config.planner


def main_config(args):
    from mbrl_bilevel.cli import parse_command

    return parse_command("train", args)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--mbpo.updates-per-step", "0", "--agent", "mbpo"],
            "--mbpo.updates-per-step must be > 0",
        ),
        (["--mbpo.updates-per-step", "many", "--agent", "mbpo"], "--mbpo.updates-per-step"),
        (["--mbpo.real-ratio", "2", "--agent", "mbpo"], "--mbpo.real-ratio"),
        (["--planner.horizon", "-3"], "--planner.horizon must be > 0"),
        (["--planner.elites", "900"], "cannot exceed --planner.population"),
        (["--model.elite-members", "9"], "cannot exceed --model.members"),
        (["--pg.estimator", "magic"], "unknown PG estimator"),
        (["--pg.lam", "0"], "λ"),
        (["--model.width", "3"], "Unrecognized options: --model.width"),
        (["--agent", "mbpo", "--planner.horizon", "5"], "--planner.* options apply to pets only"),
        (["--preset", "huge"], "unknown preset 'huge'"),
        (["--dynamics-loss", "magic"], "unknown dynamics loss"),
    ],
)
def test_bad_fields_exit_2_with_one_line(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--out-dir", str(tmp_path), "--no-progress", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not any(tmp_path.iterdir())


def test_a_bad_field_exits_2_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mbrl_bilevel.cli", "train", "--mbpo.tau", "x", "--agent", "mbpo"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "mbrl-bilevel: error: --mbpo.tau: could not convert string to float: 'x'"
    ]


def test_a_sweep_grids_over_a_planner_field(tmp_path):
    spec = tmp_path / "horizons.toml"
    spec.write_text(
        f"""command = "train"
out_dir = "{tmp_path}"
[options]
env = "{POINT_MASS_ID}"
preset = "tiny"
dynamics_loss = "nll"
steps = 60
eval_every = 60
eval_episodes = 1
[grid]
"planner.horizon" = [3, 5]
"""
    )
    main(["sweep", str(spec), "--jobs", "1", "--no-report"])
    runs = sorted((tmp_path / "horizons").glob("*/summary.json"))
    assert [p.parent.name for p in runs] == ["planner.horizon=3", "planner.horizon=5"]
    horizons = [json.loads((p.parent / "config.json").read_text())["planner"] for p in runs]
    assert [h["horizon"] for h in horizons] == [3, 5]
    assert {h["population"] for h in horizons} == {100}  # the rest is tiny's


def test_resume_uses_the_resolved_config(tmp_path):
    args = ["--env", POINT_MASS_ID, "--preset", "tiny", "--dynamics-loss", "nll", "--steps", "60"]
    args += ["--planner.horizon", "4", "--eval-every", "60", "--eval-episodes", "1"]
    main(["train", *args, "--out-dir", str(tmp_path), "--name", "run", "--no-progress"])
    run = tmp_path / "run"
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(saved | {"steps": 110}))
    (run / "summary.json").unlink()
    main(["train", "--resume", str(run), "--no-progress"])
    resumed = json.loads((run / "config.json").read_text())
    assert resumed["planner"]["horizon"] == 4 and resumed["steps"] == 110
    assert json.loads((run / "summary.json").read_text())["env_steps"] == 110
    assert TrainConfig().planner.horizon == 30  # the plain default is not what the run used


def test_log_messages_go_to_the_run_log_and_to_the_console_only_when_verbose(tmp_path, capsys):
    import logging

    from agents.commands import run_log

    log = logging.getLogger("mbrl_bilevel.solvers.updates")
    with run_log(tmp_path / "quiet.txt", verbose=False):
        log.debug("outer step 3 skipped: not stationary")
    assert "outer step 3 skipped" in (tmp_path / "quiet.txt").read_text()
    assert capsys.readouterr().err == ""
    with run_log(tmp_path / "loud.txt", verbose=True):
        log.debug("outer step 4 skipped: not stationary")
    assert "outer step 4 skipped" in capsys.readouterr().err
    log.debug("after the run")  # its handlers are gone
    assert "after the run" not in (tmp_path / "loud.txt").read_text()


def test_the_default_job_prints_a_short_summary(tmp_path):
    """The main job's console, shortened to 300 steps: no per-step solver lines, at most 30."""
    result = subprocess.run(
        [sys.executable, "-m", "mbrl_bilevel.cli", "train", "--steps", "300", "--eval-every", "300"]
        + ["--eval-episodes", "1", "--out-dir", str(tmp_path), "--name", "job"],
        capture_output=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    output = (result.stdout + result.stderr).decode()  # bytes: the bar redraws itself with \r
    lines = output.strip().split("\n")
    assert len(lines) <= 30 and not any("skipped" in line for line in lines), lines
    assert (tmp_path / "job" / "log.txt").is_file()
