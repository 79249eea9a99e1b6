"""The batched Gaussian ensemble, its learner, and β-NLL."""

import pytest
import torch
from torch.func import functional_call, grad

from mbrl_bilevel.data import Dataset
from mbrl_bilevel.ensemble import (
    EnsembleLearner,
    GaussianEnsemble,
    NormalisedTargets,
    bootstrap_batches,
)
from mbrl_bilevel.losses import BetaNLLLoss, NLLLoss, PGLoss
from mbrl_bilevel.models import GaussianMLP
from mbrl_bilevel.rewards import FixedMahalanobis
from mbrl_bilevel.training import FitConfig


def linear_data(n=1500, seed=0, scale=(3.0, 0.02)):
    """y = xW + noise with very different target scales per output dimension."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    W = torch.tensor([[1.0, 0.5], [-0.5, 1.0], [0.2, 0.0]])
    y = (x @ W + 0.3 * torch.randn(n, 2, generator=g)) * torch.tensor(scale)
    return Dataset(x, y)


def test_frozen_members_match_the_ensemble_and_ignore_later_training():
    torch.manual_seed(0)
    ens = GaussianEnsemble(4, 3, members=5, elites=2, hidden=(8, 8))
    ens.fit_normaliser(torch.randn(50, 4) * 3 + 1, torch.randn(50, 3) * 2 - 1)
    members = torch.tensor([4, 1])
    with torch.no_grad():  # log-variances at both soft bounds and between them
        ens.weights[-1][..., 3:].mul_(torch.tensor([1.0, 300.0, -300.0]))
    frozen = ens.frozen_members(members)
    x = torch.randn(2, 6, 4)
    full = ens(torch.zeros(5, 6, 4).index_copy(0, members, x))
    mean, std = frozen(x)
    assert torch.allclose(mean, full.mean[members], atol=1e-5, rtol=1e-5)
    assert torch.allclose(std, full.stddev[members], atol=1e-5, rtol=1e-5)
    half_mean, _ = ens.frozen_members(members, torch.bfloat16)(x)
    assert half_mean.dtype == torch.float32
    assert torch.allclose(half_mean, mean, atol=0.05 * mean.abs().max().item())
    with torch.no_grad():
        ens.weights[0].add_(1.0)
        ens.target_mean.add_(1.0)
    assert torch.equal(frozen(x)[0], mean)


def test_forward_shapes_and_members_match_a_loop():
    torch.manual_seed(0)
    ens = GaussianEnsemble(4, 3, members=5, elites=2, hidden=(8, 8))
    x = torch.randn(6, 4)
    dist = ens(x)
    assert dist.batch_shape == (5, 6) and dist.event_shape == (3,)
    assert ens(x.expand(5, 6, 4)).mean.shape == (5, 6, 3)
    assert ens.mixture(x).batch_shape == (6,) and ens.mixture(x).event_shape == (3,)
    # member 3 computed by hand
    h = x
    for i, (w, b) in enumerate(zip(ens.weights, ens.biases, strict=True)):
        h = h @ w[3] + b[3]
        h = torch.nn.functional.silu(h) if i < 2 else h
    torch.testing.assert_close(dist.mean[3], h[:, :3])
    assert not torch.allclose(dist.mean[0], dist.mean[1])  # members initialised independently


def test_normaliser_changes_only_through_explicit_call_and_views_agree():
    torch.manual_seed(0)
    data = linear_data()
    ens = GaussianEnsemble(3, 2, members=3, elites=2, hidden=(16,))
    before = ens(data.x[:5]).mean
    torch.testing.assert_close(ens(data.x[:5]).mean, before)  # pure
    ens.fit_normaliser(data.x, data.y)
    torch.testing.assert_close(ens.target_std, data.y.std(0))
    raw, norm = ens(data.x[:5]), NormalisedTargets(ens)(data.x[:5])
    torch.testing.assert_close(raw.mean, norm.mean * ens.target_std + ens.target_mean)
    torch.testing.assert_close(raw.stddev, norm.stddev * ens.target_std)
    # forward works under torch.func (what the implicit solver needs)
    params = dict(ens.named_parameters())
    g = grad(lambda p: -functional_call(ens, p, (data.x[:8],)).log_prob(data.y[:8]).mean())(params)
    assert g["weights.0"].shape == ens.weights[0].shape and torch.isfinite(g["weights.0"]).all()


def test_log_variance_is_softly_bounded():
    ens = GaussianEnsemble(2, 2, members=2, elites=1, hidden=(4,), min_log_var=-3, max_log_var=1)
    with torch.no_grad():
        ens.biases[-1][..., 2:] = torch.tensor([50.0, -50.0])
    log_var = NormalisedTargets(ens)(torch.zeros(3, 2)).variance.log()
    assert (log_var[..., 0] < 1.05).all() and (log_var[..., 1] > -3.05).all()  # soft: ~±0.02
    assert ens.log_var_penalty().item() == pytest.approx(2 * (1 - -3))


def test_bootstrap_batches_give_each_member_its_own_sample():
    data = Dataset(torch.arange(100.0)[:, None], torch.arange(100.0)[:, None])
    batches = bootstrap_batches(data, 4, 10, torch.Generator().manual_seed(0))
    epoch = [next(batches) for _ in range(10)]
    assert epoch[0].x.shape == (4, 10, 1) and epoch[0].y.shape == (4, 10, 1)
    seen = torch.cat([b.x for b in epoch], dim=1)[..., 0]  # [E, N]: one epoch per member
    assert not torch.equal(seen[0].sort().values, seen[1].sort().values)
    assert all(len(row.unique()) < 100 for row in seen)  # drawn with replacement
    torch.testing.assert_close(epoch[3].x, epoch[3].y)  # x and y rows stay paired


def test_pg_under_constant_reward_learns_normalised_covariance():
    """SPEC 2 in normalised units: U = u·I gives normalised variance λ/(2u) in every dimension,
    i.e. raw variance target_std² · λ/(2u), whatever the true noise."""
    torch.manual_seed(0)
    data, lam, u = linear_data(), 1.0, 5.0
    ens = GaussianEnsemble(3, 2, members=3, elites=2, hidden=(32,))
    loss = PGLoss(FixedMahalanobis(u * torch.eye(2)), lam, generations=8)
    config = FitConfig(steps=600, lr=5e-3, batch_size=256, eval_every=600)
    EnsembleLearner(loss, config, penalty=0.0, progress=False).fit(ens, data, None)
    variance = ens(data.x[:200]).variance.mean((0, 1))
    expected = ens.target_std**2 * lam / (2 * u)
    torch.testing.assert_close(variance, expected, rtol=0.15, atol=0)


def test_learner_early_stops_and_picks_elites_on_validation():
    torch.manual_seed(0)
    train, val = linear_data(800, seed=1), linear_data(400, seed=2)
    ens = GaussianEnsemble(3, 2, members=4, elites=2, hidden=(32,))
    config = FitConfig(steps=3000, lr=1e-2, batch_size=64, eval_every=20, patience=3)
    metrics = EnsembleLearner(NLLLoss(), config, progress=False).fit(ens, train, val)
    assert metrics["best_step"] < 3000
    with torch.no_grad():  # sabotage one member: it must drop out of the elites
        ens.biases[-1][1, :, :2] += 10.0
    scores = ens.select_elites(val)
    assert ens.elite_mask.sum() == 2 and not ens.elite_mask[1] and scores[1] == scores.max()
    assert ens.mixture(val.x).mixture_distribution.probs.shape == (400, 2)
    mixture_nll = -ens.mixture(val.x).log_prob(val.y).mean()
    assert torch.isfinite(mixture_nll)


def test_beta_nll_reduces_to_nll_and_to_mse_gradients():
    torch.manual_seed(0)
    model = GaussianMLP(3, 2, hidden=(8,))
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    loss0, _ = BetaNLLLoss(0.0)(model, x, y)
    nll, _ = NLLLoss()(model, x, y)
    torch.testing.assert_close(loss0, nll / 2)
    # β = 1: the gradient w.r.t. the mean is (μ - y)/(B·D), as for MSE/2
    mean = torch.zeros(16, 2, requires_grad=True)
    std = torch.rand(16, 2) + 0.5

    def predictor(_x):
        return torch.distributions.Independent(torch.distributions.Normal(mean, std), 1)

    BetaNLLLoss(1.0)(predictor, x, y)[0].backward()
    torch.testing.assert_close(mean.grad, (mean - y).detach() / 32)
