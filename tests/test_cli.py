"""The command line: a tiny real run writes its folder; bad input exits 2 without a traceback."""

import json
import subprocess
import sys

import pytest

from mbrl_bilevel.cli import main
from mbrl_bilevel.validation import ConfigError


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "mbrl_bilevel.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_gaussian_run_writes_run_folder(tmp_path, capsys):
    main(
        [
            "gaussian",
            "--dim",
            "3",
            "--lam",
            "0.7",
            "--sigma",
            "2,0.5,0;0.5,1,0.3;0,0.3,0.5",
            "--steps",
            "40",
            "--seeds",
            "2",
            "--eval-every",
            "20",
            "--out-dir",
            str(tmp_path),
            "--name",
            "tiny",
        ]
    )
    run = tmp_path / "tiny"
    assert "run folder: " + str(run) in capsys.readouterr().out
    for name in (
        "config.json",
        "summary.json",
        "metrics.csv",
        "table.md",
        "plots/gaussian_study.png",
    ):
        assert (run / name).is_file(), name
    assert list((run / "tb").glob("pg-star-seed1/events.*"))
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["final"]) == {"nll", "pg-star", "pg-identity", "pg-scaled"}
    assert summary["final"]["nll"]["nll"]["n"] == 2
    assert json.loads((run / "config.json").read_text())["lam"] == 0.7


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lam", "0"], "λ"),
        (["--lam", "-1"], "λ"),
        (["--sigma", "1,2;2,1"], "positive definite"),
        (["--sigma", "1,0.5;0,1"], "symmetric"),
        (["--dim", "3", "--sigma", "1,0;0,1"], "dimension is 3"),
        (["--steps", "0"], "steps"),
        (["--methods", "nll,magic"], "unknown methods"),
        (["--sigma", "/nonexistent.npy"], "cannot read"),
    ],
)
def test_bad_input_exits_2_with_one_message(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["gaussian", "--out-dir", str(tmp_path), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not any(tmp_path.iterdir())  # refused before any run folder is made


def test_installed_process_exits_2_without_traceback(tmp_path):
    result = run_cli("gaussian", "--lam", "-1", "--out-dir", str(tmp_path))
    assert result.returncode == 2
    assert "λ" in result.stderr and "Traceback" not in result.stderr
    help_result = run_cli("--help")
    assert help_result.returncode == 0 and "gaussian" in help_result.stdout


def test_a_finished_run_folder_is_never_reused(tmp_path):
    from mbrl_bilevel.runs import create_run_dir

    run = create_run_dir(tmp_path, "run", "gaussian")
    assert create_run_dir(tmp_path, "run", "gaussian") == run  # unfinished: restarted in place
    (run / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds a finished run"):
        create_run_dir(tmp_path, "run", "gaussian")
