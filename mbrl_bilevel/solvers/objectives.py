"""Differentiable forms of the inner PG objective J(θ; φ), for second-order (IFT) and unrolled
hypergradients. Never the REINFORCE surrogate: its curvature is not the curvature of J.

An Objective is a callable objective(predictor, reward, x, y) -> J, a scalar tensor that is
differentiable in the parameters of both modules (so torch.func.functional_call can swap them):

    J = mean over inputs (and ensemble members) of E_ŷ~p_θ(.|x) [r_φ(ŷ, y)] + λ H(p_θ(.|x))

- GaussianClosedForm: Gaussian predictor, Mahalanobis reward (constant U or U(x)): exact.
- CategoricalExact: categorical predictor, one-hot reward: exact sum over the C classes.
- Pathwise: any reparameterisable predictor and reward: a G-sample estimate with fixed noise
  (the same samples at every call with the same seed, so HVPs see one deterministic function).

Shapes: x [B, in]; y [B, D] (or [B] class indices); the predictor's distribution may carry a
leading ensemble dimension E (mean [E, B, D]); y broadcasts against it.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from torch.distributions import Independent, Normal

from mbrl_bilevel.gaussian import expected_mahalanobis_reward
from mbrl_bilevel.models import covariance
from mbrl_bilevel.validation import ConfigError, check_positive


class Objective(Protocol):
    lam: float

    def __call__(
        self, predictor: nn.Module, reward: nn.Module, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor: ...


class GaussianClosedForm:
    """J = mean_b [-(μ - y)ᵀU(μ - y) - tr(U S) + λ H(N(μ, S))] with U = reward.matrix_at(x); the
    entropy comes from the distribution (no per-input log det when S is shared by all inputs).
    A diagonal S (Independent Normal) takes `reward.expected`, which never builds [D, D] per
    input where the reward does not need it."""

    def __init__(self, lam: float):
        self.lam = check_positive(lam, "entropy weight λ")

    def __call__(self, predictor, reward, x, y):
        dist = predictor(x)
        if isinstance(dist, Independent) and isinstance(dist.base_dist, Normal):
            expected = reward.expected(dist.mean, dist.variance, y, x)
        else:
            expected = expected_mahalanobis_reward(
                dist.mean, covariance(dist), y, reward.matrix_at(x)
            )
        return (expected + self.lam * dist.entropy()).mean()


class CategoricalExact:
    """J = mean_b [Σ_k p_θ(k|x_b) R[k, y_b] + λ H(p_θ(.|x_b))] with R = reward.pairwise() [C, C]."""

    def __init__(self, lam: float):
        self.lam = check_positive(lam, "entropy weight λ")

    def __call__(self, predictor, reward, x, y):
        dist = predictor(x)
        table = reward.pairwise()[:, y.long()]  # [C, B]: R[k, y_b]
        expected = (dist.probs * table.T).sum(-1)  # [..., B]
        return (expected + self.lam * dist.entropy()).mean()


class Pathwise:
    """J ≈ mean_{g,b} r(ŷ_g, y, x) + λ mean_b H, ŷ_g = rsample with noise drawn from `seed`."""

    def __init__(self, lam: float, generations: int = 16, seed: int = 0):
        self.lam = check_positive(lam, "entropy weight λ")
        if generations < 1:
            raise ConfigError(f"generations must be >= 1, got {generations}")
        self.generations, self.seed = generations, seed

    def __call__(self, predictor, reward, x, y):
        dist = predictor(x)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            y_hat = dist.rsample((self.generations,))
        return reward(y_hat, y, x).mean() + self.lam * dist.entropy().mean()
