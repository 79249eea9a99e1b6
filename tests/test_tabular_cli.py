"""`mbrl-bilevel tabular`: a tiny run writes its folder; bad input exits 2 without a traceback."""

import json
import subprocess
import sys

import pandas as pd
import pytest

from mbrl_bilevel.cli import main


def test_tabular_run_writes_run_folder(tmp_path, capsys):
    main(
        [
            "tabular",
            "--dataset",
            "iris",
            "--methods",
            "nll,pg,pg-star",
            "--seeds",
            "2",
            "--steps",
            "30",
            "--jobs",
            "1",
            "--out-dir",
            str(tmp_path),
            "--name",
            "tiny",
        ]
    )
    run = tmp_path / "tiny"
    out = capsys.readouterr().out
    assert "| iris | pg-star |" in out and f"run folder: {run}" in out
    for name in ("config.json", "summary.json", "metrics.csv", "curves.csv", "table.md"):
        assert (run / name).is_file(), name
    assert (run / "plots" / "iris_curves.png").is_file()
    assert (run / "plots" / "tabular_nll.png").is_file()
    assert list((run / "tb" / "iris").glob("pg-star-seed1/events.*"))
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["final"]["iris"]) == {"nll", "pg", "pg-star"}
    assert summary["final"]["iris"]["pg"]["roc_auc"]["n"] == 2
    assert summary["final"]["iris"]["pg-star"]["beta"]["mean"] > 20  # β* = 10·3/(2·0.67)
    assert summary["acceptance"]["iris"]["pg_star_minus_pg_nll"]["mean"] < 0
    metrics = pd.read_csv(run / "metrics.csv")
    assert len(metrics) == 6 and set(metrics.columns) >= {"accuracy", "nll", "ece", "macro_f1"}


def bad_csvs(tmp_path):
    good = pd.DataFrame({"a": [1.0, 2, 3, 4, 5, 6], "label": [0, 1] * 3})
    files = {
        "no_target": good.rename(columns={"label": "y"}),
        "text": good.assign(b=list("pqrstu")),
        "single": good.assign(label=[0, 1, 0, 1, 0, 2]),
        "nan": good.assign(a=[1.0, None, 3, 4, 5, 6]),
    }
    for name, frame in files.items():
        frame.to_csv(tmp_path / f"{name}.csv", index=False)
    return {name: str(tmp_path / f"{name}.csv") for name in files}


@pytest.mark.parametrize(
    "csv, args, message",
    [
        ("no_target", [], "no target column 'label'"),
        ("text", [], "non-numeric feature columns ['b']"),
        ("single", [], "class 2 has a single sample"),
        ("nan", [], "1 NaN values; clean them or pass --impute mean"),
        ("nan", ["--impute", "median"], "unknown --impute 'median'"),
        (None, ["--dataset", "mnist"], "unknown dataset 'mnist'"),
        (None, ["--methods", "nll,magic"], "unknown methods ['magic']"),
        (None, ["--lam", "0"], "λ"),
    ],
)
def test_bad_input_exits_2(csv, args, message, tmp_path, capsys):
    if csv is not None:
        args = ["--csv", bad_csvs(tmp_path)[csv], "--target", "label", *args]
    out_dir = tmp_path / "runs"
    with pytest.raises(SystemExit) as exit_info:
        main(["tabular", "--out-dir", str(out_dir), "--methods", "nll,pg-star", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out_dir.exists()  # refused before any run folder is made


def test_bad_input_has_no_traceback_in_a_real_process(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mbrl_bilevel.cli", "tabular", "--csv", bad_csvs(tmp_path)["text"]]
        + ["--target", "label", "--methods", "nll", "--out-dir", str(tmp_path / "runs")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "non-numeric feature columns" in result.stderr and "Traceback" not in result.stderr
