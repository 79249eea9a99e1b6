"""`mbrl-bilevel gaussian --solver ...` and `mbrl-bilevel bench solvers`: tiny real runs."""

import json

import pytest

from mbrl_bilevel.cli import main

SIGMA = "2,0.6,0.2;0.6,1,0.3;0.2,0.3,0.25"


@pytest.mark.parametrize("solver, reward", [("implicit", "full"), ("plugin", "diag")])
def test_gaussian_with_solver_writes_learned_u(tmp_path, solver, reward):
    main(
        ["gaussian", "--dim", "3", "--lam", "0.7", "--sigma", SIGMA, "--methods", "nll"]
        + ["--solver", solver, "--reward", reward, "--steps", "40", "--warmup-steps", "10"]
        + ["--inner-steps", "10", "--seeds", "1", "--n-inputs", "50", "--eval-every", "20"]
        + ["--out-dir", str(tmp_path), "--name", "tiny"]
    )
    run = tmp_path / "tiny"
    summary = json.loads((run / "summary.json").read_text())
    label = f"{solver}-{reward}"
    assert set(summary["final"]) == {"nll", label}
    entry = summary["solver"]
    assert entry["label"] == label and len(entry["U_learned"]) == 1
    assert len(entry["U_star"]) == 3 and 0 < entry["rel_frobenius_error_mean"] < 10
    assert (run / "plots" / "u_entries.png").is_file()
    assert list((run / "tb").glob(f"{label}-seed0/events.*"))


def test_input_dependent_reward_on_heteroscedastic_data(tmp_path):
    main(
        ["gaussian", "--dim", "2", "--noise", "hetero", "--methods", "nll", "--solver"]
        + ["implicit", "--reward", "input", "--steps", "30", "--warmup-steps", "10"]
        + ["--inner-steps", "10", "--seeds", "1", "--n-inputs", "40", "--eval-every", "10"]
        + ["--out-dir", str(tmp_path), "--name", "het"]
    )
    entry = json.loads((tmp_path / "het" / "summary.json").read_text())["solver"]
    assert entry["U_learned"] == [None] and entry["U_star"] is None
    assert entry["rel_frobenius_error_mean"] > 0  # mean over held-out x of ‖U(x) - U*(x)‖/‖U*(x)‖


@pytest.mark.parametrize(
    "args, message",
    [
        (["--solver", "magic"], "unknown --solver"),
        (["--solver", "plugin", "--reward", "input"], "does not fit"),
        (["--solver", "implicit", "--reward", "identity"], "does not fit"),
        (["--solver", "implicit", "--linear-solver", "lu"], "linear-solver"),
        (["--solver", "implicit", "--steps", "100", "--warmup-steps", "100"], "no outer step"),
        (["--solver", "implicit", "--outer-lr", "0"], "outer-lr"),
        (["--noise", "hetero"], "use --methods nll"),
        (["--noise", "wobbly", "--methods", "nll"], "--noise"),
        (["--solver", "implicit", "--lam", "-1"], "λ"),
    ],
)
def test_bad_solver_options_exit_2(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["gaussian", "--out-dir", str(tmp_path), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before any run folder is made


def test_bench_solvers_prints_ratios(tmp_path, capsys):
    main(
        ["bench", "solvers", "--solvers.n", "50", "--solvers.repeats", "1"]
        + ["--solvers.inner-steps", "2", "--solvers.cg-iterations", "2"]
        + ["--out-dir", str(tmp_path), "--name", "b"]
    )
    out = capsys.readouterr().out
    assert "ratio to one inner PG step" in out and "implicit hypergradient, CG x2" in out
    rows = json.loads((tmp_path / "b" / "summary.json").read_text())["rows"]
    assert rows[0]["ratio_to_inner_step"] == 1.0 and all(r["median_ms"] > 0 for r in rows)
