"""Issue 4 acceptance on the bundled datasets (slow: about 4 minutes on 2 busy cores)."""

import pytest

from mbrl_bilevel.tabular import TabularConfig, run_study

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("dataset", ["wine", "breast_cancer", "digits"])
def test_pg_star_and_bilevel_match_nll_accuracy(dataset, tmp_path):
    # iris is left out: its test split has 30 rows, so one prediction is 3.3 points and the
    # 5-seed mean moves in steps of 0.67 points (docs/tabular.md shows its numbers)
    methods = "nll,pg,pg-star,bilevel"
    config = TabularConfig(dataset=dataset, methods=methods, out_dir=str(tmp_path), name="run")
    _, summary, _ = run_study(config)
    checks = summary["acceptance"][dataset]
    assert checks["pg_star_minus_nll_accuracy_pp"]["mean"] > -1.0
    assert checks["pg_star_minus_pg_nll"]["mean"] < 0
    assert checks["bilevel_minus_nll_accuracy_pp"]["mean"] > -1.0
