"""Entropy-regularised PG converges to the closed-form optimum (SPEC section 2)."""

import math

import torch

from mbrl_bilevel.gaussian import (
    SyntheticGaussian,
    inner_optimal_covariance,
    optimal_reward_matrix,
)
from mbrl_bilevel.losses import PGLoss
from mbrl_bilevel.models import LinearGaussian
from mbrl_bilevel.rewards import FixedMahalanobis
from mbrl_bilevel.training import FitConfig, fit

LAM = 0.7


def train_pg(U, sigma, steps=1500):
    problem = SyntheticGaussian(sigma)
    generator = torch.Generator().manual_seed(0)
    train = problem.sample(400, 10, generator)
    test = problem.sample(200, 1, generator)
    torch.manual_seed(0)
    model = LinearGaussian(3, 3).double()
    loss = PGLoss(FixedMahalanobis(U), LAM, generations=5, baseline="mean")
    fit(model, loss, train, None, FitConfig(steps=steps, lr=5e-2, lr_schedule="cosine"))
    with torch.no_grad():
        L = model.cholesky()
        mean_error = (model(test.x).mean - problem.mean_fn(test.x)).pow(2).sum(-1).mean().sqrt()
    return L @ L.T, float(mean_error)


def rel_frobenius(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def test_pg_with_fixed_nondiagonal_reward_learns_lambda_half_u_inverse(sigma3, reward_matrix3):
    S, _ = train_pg(reward_matrix3, sigma3)
    assert rel_frobenius(S, inner_optimal_covariance(reward_matrix3, LAM)) < 0.05
    assert rel_frobenius(S, sigma3) > 0.2  # not the data covariance: U is not U*


def test_pg_with_optimal_reward_learns_data_distribution(sigma3):
    S, mean_error = train_pg(optimal_reward_matrix(sigma3, LAM), sigma3)
    assert rel_frobenius(S, sigma3) < 0.05
    assert mean_error < 0.05 * math.sqrt(float(sigma3.trace()))
