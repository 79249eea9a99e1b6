import pytest
import torch

from mbrl_bilevel.validation import ConfigError, check_finite


def test_check_finite_passes_finite_entries_whose_sum_overflows():
    huge = torch.full((4,), 3e38)
    assert check_finite(huge, "x") is huge


@pytest.mark.parametrize(
    ("values", "count"),
    [([1.0, float("nan")], 1), ([float("inf"), -float("inf"), 2.0], 2)],
)
def test_check_finite_names_how_many_entries_are_bad(values, count):
    with pytest.raises(ConfigError, match=f"x has {count} NaN or inf values"):
        check_finite(torch.tensor(values), "x")
