"""Sweep specs: grids become deterministic runs; bad specs are refused before any run starts,
with one line naming the problem."""

from pathlib import Path

import pytest

from agents.commands import TrainConfig
from mbrl_bilevel.bench import BenchConfig
from mbrl_bilevel.cli import main
from mbrl_bilevel.gaussian import GaussianConfig
from mbrl_bilevel.sweep.arguments import parse, to_argv
from mbrl_bilevel.sweep.spec import parse_spec, run_names
from mbrl_bilevel.validation import ConfigError

COMMANDS = {"train": TrainConfig, "gaussian": GaussianConfig, "bench": BenchConfig}
GOOD = """
command = "train"
[options]
preset = "tiny"
steps = 60
[grid]
env = ["mbrl_bilevel/PointMass-v0", "InvertedPendulum-v5"]
dynamics-loss = ["nll", "mse"]
seed = [0, 1]
"""


def test_grid_is_the_product_with_deterministic_names():
    import tomllib

    sweep = parse_spec(tomllib.loads(GOOD), COMMANDS, "pm")
    assert sweep.name == "pm" and str(sweep.folder) == "runs/pm"
    assert len(sweep.runs) == 8 and len({run.name for run in sweep.runs}) == 8
    first = sweep.runs[0]
    assert first.name == "env=PointMass-v0,dynamics_loss=nll,seed=0"
    assert first.options == {
        "preset": "tiny",
        "steps": 60,
        "env": "mbrl_bilevel/PointMass-v0",
        "dynamics_loss": "nll",
        "seed": 0,
    }
    assert parse_spec(tomllib.loads(GOOD), COMMANDS, "pm") == sweep


def test_variants_run_once_per_grid_point_without_product_duplicates():
    import tomllib

    text = """
command = "train"
[options]
agent = "mbpo"
[grid]
seed = [0, 1]
[[variants]]
preset = "cpu"
dynamics_loss = "nll"
[[variants]]
preset = "cpu"
dynamics_loss = "bilevel"
[[variants]]
preset = "sac"
"""
    sweep = parse_spec(tomllib.loads(text), COMMANDS, "mbpo")
    assert [run.name for run in sweep.runs] == [
        "seed=0,preset=cpu,dynamics_loss=nll",
        "seed=0,preset=cpu,dynamics_loss=bilevel",
        "seed=0,preset=sac",
        "seed=1,preset=cpu,dynamics_loss=nll",
        "seed=1,preset=cpu,dynamics_loss=bilevel",
        "seed=1,preset=sac",
    ]
    assert sweep.runs[2].options == {"agent": "mbpo", "seed": 0, "preset": "sac"}
    assert sweep.grid_fields == ["seed", "preset", "dynamics_loss"]


def test_clashing_names_get_a_hash():
    names = run_names([{"env": "a/X-v0"}, {"env": "b/X-v0"}, {"env": "Y-v0"}])
    assert names[0] != names[1] and names[0].startswith("env=X-v0-") and names[2] == "env=Y-v0"


def test_argv_round_trips_through_tyro():
    options = {"target": "solvers", "solvers.n": 50, "name": "x"}
    config = parse(BenchConfig, to_argv(BenchConfig, options), "run x")
    assert (config.target, config.solvers.n, config.name) == ("solvers", 50, "x")
    train = parse(TrainConfig, to_argv(TrainConfig, {"progress": False, "seed": 3}), "run y")
    assert (train.progress, train.seed) == (False, 3)


@pytest.mark.parametrize(
    "text, message",
    [
        ('command = "train"\n[grid]\nsteeps = [1, 2]', "unknown field 'steeps'"),
        ('command = "train"\n[grid]\nsteeps = [1, 2]', "did you mean 'steps'"),
        ('command = "train"\n[options]\nsteps = 5', "empty grid"),
        ('command = "train"\n[grid]\nseed = []', "grid.seed must be a non-empty list"),
        ('command = "train"\n[grid]\nseed = 3', "grid.seed must be a non-empty list"),
        ('command = "trian"\n[grid]\nseed = [0]', "unknown command 'trian'"),
        ('command = "train"\n[grid]\nname = ["a"]', "the sweep sets 'name'"),
        ('command = "bench"\n[grid]\n"solvers.m" = [1]', "unknown field 'm'"),
        ('command = "train"\ngrid = 1', "[grid] must be a table"),
        ('command = "train"\nseeds = [0]', "unknown top-level keys ['seeds']"),
        ('command = "train"\n[options]\nseed = 1\n[grid]\nseed = [0]', "both in [options]"),
        ('command = "train"\n[grid]\nseed = [0]\n[[variants]]\nseed = 1', "both in [grid]"),
        (
            'command = "train"\n[grid]\nseed = [0]\n[[variants]]\nsteeps = 1',
            "'steeps' in [variants]",
        ),
        ('command = "train"\nvariants = 3\n[grid]\nseed = [0]', "variants must be a list"),
        ('command = "train"\n[[variants]]\nseed = 1', "empty grid"),
    ],
)
def test_bad_spec_is_refused_naming_the_problem(text, message):
    import tomllib

    with pytest.raises(ConfigError) as error:
        parse_spec(tomllib.loads(text), COMMANDS, "bad")
    assert message in str(error.value)


@pytest.mark.parametrize(
    "lines, message",
    [
        ('[grid]\nenv = ["mbrl_bilevel/PointMass-v0", "NoSuchEnv-v0"]', "unknown environment"),
        ('[grid]\nenv = ["InvertedPendulum-v9"]', "InvertedPendulum-v9"),
        ('[grid]\nsteps = [10, "many"]', "--steps: invalid literal"),
        ('[grid]\nagent = ["pets", "dreamer"]', "unknown agent 'dreamer'"),
        ("[grid]\nsteps = [10, 0]", "--steps must be > 0"),
        ('[grid]\nsteps = [10]\n[options]\nwhat = "x"', "unknown field 'what'"),
        ("[grid]", "empty grid"),
    ],
)
def test_cli_refuses_bad_spec_before_any_run(lines, message, tmp_path, capsys):
    spec = tmp_path / "bad.toml"
    spec.write_text(f'command = "train"\nout_dir = "{tmp_path / "runs"}"\n{lines}\n')
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", str(spec)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()  # nothing started, no folder made


def test_missing_spec_file_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", str(tmp_path / "none.toml")])
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "spec", sorted((Path(__file__).parents[1] / "experiments").glob("*.toml")), ids=lambda p: p.stem
)
def test_shipped_experiment_specs_pass_every_check(spec, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["sweep", str(spec), "--dry-run"])
    assert "to start" in capsys.readouterr().out
