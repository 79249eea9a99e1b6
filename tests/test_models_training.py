import math

import pytest
import torch

from mbrl_bilevel.data import Dataset, random_split
from mbrl_bilevel.losses import MSELoss, NLLLoss
from mbrl_bilevel.models import (
    CategoricalMLP,
    FullCovGaussianMLP,
    GaussianMLP,
    covariance,
    lower_cholesky,
    soft_bound,
)
from mbrl_bilevel.training import FitConfig, LossLearner, fit
from mbrl_bilevel.validation import ConfigError


def test_predictor_shapes():
    x = torch.randn(6, 4)
    assert GaussianMLP(4, 3)(x).sample((5,)).shape == (5, 6, 3)
    assert FullCovGaussianMLP(4, 3)(x).sample((5,)).shape == (5, 6, 3)
    assert covariance(FullCovGaussianMLP(4, 3)(x)).shape == (6, 3, 3)
    assert covariance(GaussianMLP(4, 3)(x)).shape == (6, 3, 3)
    assert CategoricalMLP(4, 7)(x).sample((5,)).shape == (5, 6)


def test_lower_cholesky_places_the_entries_row_by_row():
    """raw [..., D(D+1)/2] fills L's lower triangle row by row; the diagonal is
    exp(soft_bound(raw)), the strict upper triangle zero; gradients reach every raw entry."""
    raw = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    chol = lower_cholesky(raw, 3, -1.0, 1.0)
    expected = torch.zeros(2, 5, 3, 3, dtype=torch.float64)
    k = 0
    for i in range(3):
        for j in range(i + 1):
            value = raw[..., k]
            expected[..., i, j] = soft_bound(value, -1.0, 1.0).exp() if i == j else value
            k += 1
    torch.testing.assert_close(chol, expected)
    chol.pow(2).sum().backward()
    assert bool((raw.grad != 0).all())


def test_log_std_is_softly_bounded():
    model = GaussianMLP(2, 2, hidden=(8,), min_log_std=-3.0, max_log_std=1.0)
    with torch.no_grad():
        model.net[-1].bias.fill_(100.0)
        high = model(torch.zeros(1, 2)).stddev.log()
        model.net[-1].bias.fill_(-100.0)
        low = model(torch.zeros(1, 2)).stddev.log()
    assert (high <= 1.05).all() and (high > 0.9).all()  # soft: may pass the bound by a little
    assert (low >= -3.05).all() and (low < -2.9).all()


def heteroscedastic_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g) * 4 - 2
    y = torch.sin(x) + (0.05 + 0.3 * x.abs()) * torch.randn(n, 1, generator=g)
    return Dataset(x, y)


def test_nll_learns_heteroscedastic_noise_and_beats_mse_on_likelihood():
    train, val = heteroscedastic_data(2000, 0), heteroscedastic_data(500, 1)
    torch.manual_seed(0)
    config = FitConfig(steps=600, lr=3e-3, batch_size=256, eval_every=50)
    model = GaussianMLP(1, 1, hidden=(32, 32))
    result = fit(model, NLLLoss(), train, val, config)
    std = model(torch.tensor([[0.0], [1.8]])).stddev.squeeze()
    assert std[1] > 2 * std[0]
    rmse = result.metrics["val/rmse"]
    homoscedastic_nll = 0.5 * math.log(2 * math.pi * math.e * rmse**2)  # same mean, one std
    assert result.metrics["val/nll"] < homoscedastic_nll - 0.1
    assert rmse < 0.45


def test_early_stopping_restores_best_weights():
    train, val = heteroscedastic_data(64, 0), heteroscedastic_data(500, 1)
    torch.manual_seed(0)
    model = GaussianMLP(1, 1, hidden=(64, 64))
    config = FitConfig(steps=3000, lr=1e-2, eval_every=20, patience=5)
    result = fit(model, NLLLoss(), train, val, config)
    best = min(row["val/nll"] for row in result.history)
    assert result.history[-1]["step"] < 3000  # it stopped early
    assert result.metrics["val/nll"] == pytest.approx(best, rel=1e-5)


def test_learner_continues_step_axis_and_bad_splits():
    train, val = heteroscedastic_data(100, 0), heteroscedastic_data(50, 1)
    learner = LossLearner(MSELoss(), FitConfig(steps=20, eval_every=10, select_on="rmse"))
    model = GaussianMLP(1, 1, hidden=(8,))
    assert "val/rmse" in learner.fit(model, train, val)
    learner.fit(model, train, val)
    assert learner.global_step == 40
    with pytest.raises(ConfigError):
        learner.fit(model, train.subset(torch.arange(0)), val)


def test_dataset_checks_and_split():
    with pytest.raises(ConfigError, match="NaN"):
        Dataset(torch.tensor([[float("nan")]]), torch.zeros(1, 1))
    with pytest.raises(ConfigError, match="rows"):
        Dataset(torch.zeros(3, 1), torch.zeros(2, 1))
    parts = random_split(heteroscedastic_data(100, 0), [0.5, 0.2, 0.3], torch.Generator())
    assert [len(p) for p in parts] == [50, 20, 30]
    with pytest.raises(ConfigError):
        FitConfig(steps=0)
