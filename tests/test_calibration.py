import csv

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from mbrl_bilevel.calibration import fit_variance_scale, scale_variance
from mbrl_bilevel.cli import main
from mbrl_bilevel.validation import ConfigError
from tests.test_dynamics import TINY, linear_system


def diagonal_gaussian(loc, scale):
    return Independent(Normal(loc, scale), 1)


def test_gaussian_factor_is_the_mean_squared_standardised_residual():
    torch.manual_seed(0)
    loc, scale = torch.randn(500, 3), torch.rand(500, 3) + 0.1
    y = loc + scale * torch.randn(500, 3) * torch.tensor([0.5, 1.0, 2.0])
    factor = fit_variance_scale(diagonal_gaussian(loc, scale), y)
    closed_form = ((y - loc) / scale).pow(2).mean(0)
    torch.testing.assert_close(factor, closed_form, rtol=1e-3, atol=0)
    scaled = scale_variance(diagonal_gaussian(loc, scale), factor)
    torch.testing.assert_close(scaled.mean, loc)
    torch.testing.assert_close(scaled.variance, scale.pow(2) * factor)


def test_mixture_factor_recovers_overdispersed_components():
    """Targets drawn from a 3-component mixture whose variances are 0.3 × the predicted ones."""
    torch.manual_seed(1)
    batch, members, dim = 20_000, 3, 2
    loc = torch.randn(batch, members, dim)
    scale = torch.rand(batch, members, dim) + 0.2
    weights = Categorical(logits=torch.zeros(batch, members))
    truth = MixtureSameFamily(weights, diagonal_gaussian(loc, scale * 0.3**0.5))
    predicted = MixtureSameFamily(weights, diagonal_gaussian(loc, scale))
    y = truth.sample()
    factor = fit_variance_scale(predicted, y)
    torch.testing.assert_close(factor, torch.full((dim,), 0.3), rtol=0.05, atol=0)
    calibrated = scale_variance(predicted, factor)
    assert calibrated.log_prob(y).mean() > predicted.log_prob(y).mean() + 0.1
    torch.testing.assert_close(calibrated.mean, predicted.mean)


def test_only_gaussians_can_be_calibrated():
    with pytest.raises(ConfigError, match="diagonal Gaussians"):
        scale_variance(Categorical(logits=torch.zeros(4, 3)), torch.ones(3))


def test_dynamics_calibrate_reports_factors_and_leaves_mse_unchanged(tmp_path):
    path = tmp_path / "lin.npz"
    linear_system().save_npz(path)
    args = ["dynamics", "--dataset", str(path), "--strategies", "mse,nll", *TINY]
    args += ["--steps", "60", "--eval-every", "20", "--out-dir", str(tmp_path)]
    main([*args, "--name", "plain"])
    main([*args, "--name", "calibrated", "--calibrate"])
    plain, calibrated = (
        {(r["strategy"], r["seed"]): r for r in csv.DictReader(open(tmp_path / n / "metrics.csv"))}
        for n in ("plain", "calibrated")
    )
    for key, row in calibrated.items():
        assert float(row["rmse"]) == pytest.approx(float(plain[key]["rmse"]), rel=1e-6)
        assert float(plain[key]["variance_scale"]) == 1.0
    for seed in ("0", "1"):
        mse = calibrated[("mse", seed)]  # its variance is already the validation optimum
        assert float(mse["variance_scale"]) == pytest.approx(1.0, abs=1e-3)
        assert float(mse["nll"]) == pytest.approx(float(plain[("mse", seed)]["nll"]), abs=1e-4)
        assert float(calibrated[("nll", seed)]["variance_scale"]) != pytest.approx(1.0, abs=1e-3)
