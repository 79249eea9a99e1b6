import torch

from mbrl_bilevel.data import Dataset
from mbrl_bilevel.ensemble import GaussianEnsemble
from mbrl_bilevel.mean_head import refit_mean_head


def ensemble_and_linear_targets(noise: float):
    """Targets that member 0's mean head can fit exactly up to `noise`: a linear map of its
    own trunk features."""
    torch.manual_seed(0)
    ensemble = GaussianEnsemble(5, 3, members=3, elites=2, hidden=(16, 16))
    x = torch.randn(500, 5)
    with torch.no_grad():
        features = ensemble.trunk(x)[0]
        y = features @ torch.randn(16, 3) + torch.tensor([0.5, -1.0, 2.0])
    return ensemble, Dataset(x, y + noise * torch.randn_like(y))


def member_rmse(ensemble, data):
    with torch.no_grad():
        mean, _ = ensemble.normalised_head(data.x)
    return (mean - data.y).pow(2).mean((1, 2)).sqrt()


def test_mean_phase_recovers_an_exact_linear_readout_of_the_trunk():
    ensemble, data = ensemble_and_linear_targets(noise=0.0)
    log_var_head = ensemble.weights[-1][..., 3:].clone()
    metrics = refit_mean_head(ensemble, data, ridge=0.0, chunk=128)
    assert member_rmse(ensemble, data)[0] < 1e-4
    assert torch.equal(ensemble.weights[-1][..., 3:], log_var_head)  # the variance half stays
    assert metrics["mean_head/train_rmse"] < metrics["mean_head/train_rmse_before"]


def test_mean_phase_reports_the_rmse_it_reaches_and_never_raises_the_training_error():
    ensemble, data = ensemble_and_linear_targets(noise=0.3)
    before = member_rmse(ensemble, data)
    metrics = refit_mean_head(ensemble, data, ridge=1e-4, chunk=128)
    after = member_rmse(ensemble, data)
    assert (after <= before).all()
    expected_before = before.pow(2).mean().sqrt()
    assert abs(metrics["mean_head/train_rmse_before"] - float(expected_before)) < 1e-4
    assert abs(metrics["mean_head/train_rmse"] - float(after.pow(2).mean().sqrt())) < 1e-4
