"""Losses against closed forms: NLL constants, and the PG estimator against ∇J."""

import math

import pytest
import torch

from mbrl_bilevel.gaussian import pg_objective
from mbrl_bilevel.losses import BetaPGLoss, NLLLoss, PathwisePGLoss, PGLoss, subtract_baseline
from mbrl_bilevel.models import CategoricalLogistic, GaussianMLP, LinearGaussian
from mbrl_bilevel.rewards import DiagonalInputMahalanobis, FixedMahalanobis
from mbrl_bilevel.validation import ConfigError


def test_full_covariance_nll_includes_constants():
    torch.manual_seed(0)
    model = LinearGaussian(3, 3, covariance="full").double()
    with torch.no_grad():
        model.lower.copy_(torch.randn(3, 3))
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    mu, L = model.linear(x), model.cholesky()
    S = L @ L.T
    diff = y - mu
    maha = (diff @ torch.linalg.inv(S) * diff).sum(-1)
    by_hand = 0.5 * (maha + torch.logdet(S) + 3 * math.log(2 * math.pi))
    loss, metrics = NLLLoss()(model, x, y)
    assert torch.allclose(loss, by_hand.mean())
    assert metrics["nll"] == pytest.approx(by_hand.mean().item())


def test_diagonal_nll_includes_constants():
    torch.manual_seed(0)
    model = GaussianMLP(2, 3, hidden=(8,)).double()
    x, y = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    dist = model(x)
    mu, std = dist.mean, dist.stddev
    by_hand = (0.5 * ((y - mu) / std) ** 2 + std.log() + 0.5 * math.log(2 * math.pi)).sum(-1)
    assert torch.allclose(NLLLoss()(model, x, y)[0], by_hand.mean())


def test_categorical_nll_is_cross_entropy():
    torch.manual_seed(0)
    model = CategoricalLogistic(4, 3)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    expected = torch.nn.functional.cross_entropy(model.linear(x), y)
    assert torch.allclose(NLLLoss()(model, x, y)[0], expected)


def analytic_grad(model, x, y, U, lam):
    """∇_θ of -J(θ) with J in closed form (expected Mahalanobis reward + λ H), per sample mean."""
    model.zero_grad()
    L = model.cholesky()
    J = pg_objective(model.linear(x), L @ L.T, y, U, lam).mean()
    (-J).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]).clone()


def estimated_grad(model, loss, x, y):
    model.zero_grad()
    loss(model, x, y)[0].backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]).clone()


def gradient_setup():
    torch.manual_seed(0)
    model = LinearGaussian(3, 3, covariance="full", init_std=0.8).double()
    with torch.no_grad():
        model.lower.copy_(0.3 * torch.randn(3, 3))
    x = torch.randn(4, 3, dtype=torch.float64)
    y = x + 2.0 + torch.randn(4, 3, dtype=torch.float64)
    return model, x, y


@pytest.mark.parametrize("baseline", ["none", "mean"])
def test_pg_gradient_matches_analytic_gradient(reward_matrix3, baseline):
    """Score-function estimate with large G agrees with ∇J (closed form) within MC error."""
    lam = 0.7
    model, x, y = gradient_setup()
    exact = analytic_grad(model, x, y, reward_matrix3, lam)
    loss = PGLoss(FixedMahalanobis(reward_matrix3), lam, generations=20_000, baseline=baseline)
    estimates = torch.stack([estimated_grad(model, loss, x, y) for _ in range(20)])
    mean, se = estimates.mean(0), estimates.std(0) / math.sqrt(len(estimates))
    free = se > 0  # the masked upper triangle of the Cholesky parameter has no gradient
    assert torch.equal(mean[~free], exact[~free])
    z = (mean[free] - exact[free]).abs() / se[free]
    assert z.max() < 5, z
    assert torch.allclose(mean, exact, rtol=0.05, atol=0.05 * exact.abs().max())


def test_grpo_baseline_scales_reward_gradient(reward_matrix3):
    """The plain group mean scales the reward term by (G-1)/G (the bias the 'mean' option fixes)."""
    lam, G = 0.7, 4
    model, x, y = gradient_setup()
    L = model.cholesky()
    model.zero_grad()
    J = pg_objective(model.linear(x), L @ L.T, y, reward_matrix3, lam / ((G - 1) / G)).mean()
    (-(G - 1) / G * J).backward()
    exact = torch.cat([p.grad.flatten() for p in model.parameters()]).clone()
    torch.manual_seed(1)
    loss = PGLoss(FixedMahalanobis(reward_matrix3), lam, generations=G, baseline="grpo")
    x_rep, y_rep = x.repeat(20_000, 1), y.repeat(20_000, 1)
    estimate = estimated_grad(model, loss, x_rep, y_rep)
    assert torch.allclose(estimate, exact, rtol=0.05, atol=0.05 * exact.abs().max())


def test_pathwise_gradient_matches_analytic_gradient(reward_matrix3):
    lam = 0.7
    model, x, y = gradient_setup()
    exact = analytic_grad(model, x, y, reward_matrix3, lam)
    loss = PathwisePGLoss(FixedMahalanobis(reward_matrix3), lam, generations=200_000)
    estimate = estimated_grad(model, loss, x, y)
    assert torch.allclose(estimate, exact, rtol=0.02, atol=0.02 * exact.abs().max())


def test_baselines():
    r = torch.tensor([[1.0, 4.0], [3.0, 0.0], [2.0, 2.0]])
    assert torch.equal(subtract_baseline(r, "none"), r)
    loo = subtract_baseline(r, "mean")
    assert torch.allclose(loo[0], torch.tensor([1.0 - 2.5, 4.0 - 1.0]))
    assert torch.allclose(subtract_baseline(r, "grpo").mean(0), torch.zeros(2))
    assert (subtract_baseline(r, "min") >= 0).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lam": 0.0},
        {"lam": -1.0},
        {"generations": 0},
        {"baseline": "median"},
        {"generations": 1, "baseline": "mean"},
    ],
)
def test_pg_loss_rejects_bad_options(kwargs):
    options = {"lam": 1.0, "generations": 5, "baseline": "mean"} | kwargs
    with pytest.raises(ConfigError):
        PGLoss(FixedMahalanobis(torch.eye(2)), **options)


# ---------------------------------------------------------------- β-weighted PG (BetaPGLoss)


def beta_setup():
    """A diagonal GaussianMLP and an input-dependent diagonal reward U(x), both away from
    constant, on 4 inputs (float64)."""
    torch.manual_seed(0)
    model = GaussianMLP(3, 3, hidden=(8,)).double()
    reward = DiagonalInputMahalanobis(3, torch.diag(torch.tensor([0.5, 2.0, 8.0]))).double()
    with torch.no_grad():
        reward.net[-1].weight.normal_(0, 0.5)
    x = torch.randn(4, 3, dtype=torch.float64)
    y = x + 2.0 + torch.randn(4, 3, dtype=torch.float64)
    return model, reward, x, y


def analytic_beta_grad(model, reward, x, y, lam, beta):
    """∇_θ of -J_w, J_w = mean_x Σ_d w_d (-u_d((μ_d - y_d)² + s_d²) + λ ½log(2πe s_d²)),
    w_d = ((λ/2)/u_d(x))^β."""
    model.zero_grad()
    dist = model(x).base_dist
    with torch.no_grad():
        u = reward.log_diagonal_at(x).exp()
    weight = (0.5 * lam / u).pow(beta)
    entropy = 0.5 * torch.log(2 * math.pi * math.e * dist.variance)
    terms = -u * ((dist.mean - y).pow(2) + dist.variance) + lam * entropy
    (-(weight * terms).sum(-1).mean()).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]).clone()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_beta_pg_gradients_match_the_weighted_objective(beta):
    """Both estimators of BetaPGLoss are unbiased for ∇J_w (closed form): the pathwise one at
    large G, the per-dimension score function within 5 standard errors over 20 repeats."""
    lam = 0.7
    model, reward, x, y = beta_setup()
    exact = analytic_beta_grad(model, reward, x, y, lam, beta)
    pathwise = BetaPGLoss(reward, lam, generations=200_000, beta=beta, estimator="pathwise")
    estimate = estimated_grad(model, pathwise, x, y)
    assert torch.allclose(estimate, exact, rtol=0.02, atol=0.02 * exact.abs().max())
    score = BetaPGLoss(reward, lam, generations=20_000, beta=beta, estimator="score")
    estimates = torch.stack([estimated_grad(model, score, x, y) for _ in range(20)])
    mean, se = estimates.mean(0), estimates.std(0) / math.sqrt(len(estimates))
    assert ((mean - exact).abs() / se).max() < 5
    assert torch.allclose(mean, exact, rtol=0.05, atol=0.05 * exact.abs().max())


def test_beta_pg_with_beta_zero_is_pg_under_the_reward():
    """β = 0, pathwise: the same loss as PathwisePGLoss on the same samples (entropy constants
    included)."""
    model, reward, x, y = beta_setup()
    torch.manual_seed(1)
    plain, _ = PathwisePGLoss(reward, 0.7, generations=3)(model, x, y)
    torch.manual_seed(1)
    weighted, _ = BetaPGLoss(reward, 0.7, generations=3, beta=0.0)(model, x, y)
    torch.testing.assert_close(weighted, plain)


@pytest.mark.parametrize(
    "kwargs", [{"beta": -0.1}, {"beta": 1.5}, {"estimator": "exact"}, {"generations": 1}]
)
def test_beta_pg_rejects_bad_options(kwargs):
    options = {"lam": 1.0, "generations": 5, "estimator": "score"} | kwargs
    reward = DiagonalInputMahalanobis(3, torch.eye(3))
    with pytest.raises(ConfigError):
        BetaPGLoss(reward, **options)
