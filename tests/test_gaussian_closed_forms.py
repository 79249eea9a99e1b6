"""The closed forms of SPEC section 2, checked by Monte Carlo and by their own algebra."""

import math

import torch

from mbrl_bilevel.gaussian import (
    expected_mahalanobis_reward,
    gaussian_entropy,
    inner_optimal_covariance,
    optimal_reward_matrix,
    pg_objective,
    reverse_kl,
    reverse_kl_constant,
)
from mbrl_bilevel.rewards import FixedMahalanobis


def random_gaussian(dim, generator):
    mean = torch.randn(dim, generator=generator, dtype=torch.float64)
    A = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    return mean, A @ A.T + 0.5 * torch.eye(dim, dtype=torch.float64)


def test_expected_reward_matches_monte_carlo(sigma3, reward_matrix3):
    g = torch.Generator().manual_seed(0)
    mu, S = random_gaussian(3, g)
    f = torch.randn(3, generator=g, dtype=torch.float64)
    n = 400_000
    y_hat = torch.distributions.MultivariateNormal(mu, S).sample((n,))
    y = torch.distributions.MultivariateNormal(f, sigma3).sample((n,))
    rewards = FixedMahalanobis(reward_matrix3)(y_hat, y)
    mc, se = rewards.mean(), rewards.std() / math.sqrt(n)
    exact = expected_mahalanobis_reward(mu, S, f, reward_matrix3, sigma3)
    assert abs(mc - exact) < 4 * se, (float(mc), float(exact), float(se))


def test_entropy_matches_torch(sigma3):
    assert torch.allclose(
        gaussian_entropy(sigma3),
        torch.distributions.MultivariateNormal(
            torch.zeros(3, dtype=torch.float64), sigma3
        ).entropy(),
    )


def test_inner_optimum_is_stationary_and_maximal(reward_matrix3):
    """∇J = 0 at μ = f, S = (λ/2)U⁻¹, and J is lower at perturbed covariances."""
    lam = 0.7
    f = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    S_star = inner_optimal_covariance(reward_matrix3, lam)
    mu = f.clone().requires_grad_()
    chol = torch.linalg.cholesky(S_star).requires_grad_()
    J = pg_objective(mu, chol @ chol.T, f, reward_matrix3, lam)
    grads = torch.autograd.grad(J, (mu, chol))
    assert all(g.abs().max() < 1e-10 for g in grads)
    for scale in (0.9, 1.1):
        assert pg_objective(f, scale * S_star, f, reward_matrix3, lam) < J


def test_optimal_reward_gives_data_covariance(sigma3):
    lam = 0.7
    U_star = optimal_reward_matrix(sigma3, lam)
    assert torch.allclose(inner_optimal_covariance(U_star, lam), sigma3)


def test_pg_with_optimal_reward_is_reverse_kl(sigma3):
    """J(θ; U*) = -λ KL(p_θ ‖ q) + λ(H(q) - d) for arbitrary (μ, S)."""
    lam = 1.3
    g = torch.Generator().manual_seed(1)
    f = torch.randn(3, generator=g, dtype=torch.float64)
    U_star = optimal_reward_matrix(sigma3, lam)
    for _ in range(5):
        mu, S = random_gaussian(3, g)
        J = pg_objective(mu, S, f, U_star, lam, target_cov=sigma3)
        identity = -lam * reverse_kl(mu, S, f, sigma3) + reverse_kl_constant(sigma3, lam)
        assert torch.allclose(J, identity, atol=1e-10)


def test_reverse_kl_matches_torch(sigma3):
    g = torch.Generator().manual_seed(2)
    mu, S = random_gaussian(3, g)
    f = torch.randn(3, generator=g, dtype=torch.float64)
    MVN = torch.distributions.MultivariateNormal
    expected = torch.distributions.kl_divergence(MVN(mu, S), MVN(f, sigma3))
    assert torch.allclose(reverse_kl(mu, S, f, sigma3), expected)
