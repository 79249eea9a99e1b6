"""Differentiable forms of the inner PG objective J(θ; φ), for second-order (IFT) and unrolled
hypergradients. Never the REINFORCE surrogate: its curvature is not the curvature of J.

An Objective is a callable objective(predictor, reward, x, y) -> J, a scalar tensor that is
differentiable in the parameters of both modules (so torch.func.functional_call can swap them):

    J = mean over inputs (and ensemble members) of E_ŷ~p_θ(.|x) [r_φ(ŷ, y)] + λ H(p_θ(.|x))

- GaussianClosedForm: Gaussian predictor, Mahalanobis reward (constant U or U(x)): exact. For a
  diagonal Gaussian it is also a function of the outputs (mean, log-variance) alone
  (`of_outputs`), convex in them, with the closed-form output curvature `output_curvature` that
  the Gauss–Newton matrix of the IFT is built from (hypergrad.py, output_layer.py).
- CategoricalExact: categorical predictor, one-hot reward: exact sum over the C classes.
- Pathwise: any reparameterisable predictor and reward: a G-sample estimate with fixed noise
  (the same samples at every call with the same seed, so HVPs see one deterministic function).

Shapes: x [B, in]; y [B, D] (or [B] class indices); the predictor's distribution may carry a
leading ensemble dimension E (mean [E, B, D]); y broadcasts against it.
"""

from __future__ import annotations

import math
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
        if is_diagonal_normal(dist):
            return self.of_outputs(reward, dist.mean, dist.variance.log(), x, y)
        expected = expected_mahalanobis_reward(dist.mean, covariance(dist), y, reward.matrix_at(x))
        return (expected + self.lam * dist.entropy()).mean()

    def of_outputs(self, reward, mean, log_var, x, y):
        """J of the diagonal Gaussian N(mean, diag exp(log_var)), mean and log_var [..., B, D]:
        mean_b [E r(ŷ, y) + λ·½ Σ_d (log_var_d + log 2πe)]. Per input and dimension, -J is
        U_dd (μ_d - y_d)² + U_dd e^{s_d} - (λ/2) s_d + const (plus U's off-diagonal terms in μ):
        convex in (μ, s) for any SPD U."""
        entropy = 0.5 * (log_var + math.log(2 * math.pi * math.e)).sum(-1)
        return (reward.expected(mean, log_var.exp(), y, x) + self.lam * entropy).mean()

    @staticmethod
    def output_curvature(reward, log_var, x) -> torch.Tensor:
        """The diagonal of -J's Hessian in the outputs, per input and dimension, for a reward
        whose U(x) is diagonal (`reward.diagonal`): 2U_d(x) for the mean and U_d(x) e^{s_d} for
        the log-variance, no cross terms. log_var [..., B, D] -> [..., B, 2D] (mean half first);
        not divided by the number of terms that J averages."""
        if not getattr(reward, "diagonal", False):
            raise ConfigError(
                f"the output curvature is diagonal only for a diagonal reward, not {type(reward).__name__}"
            )
        u = reward.diagonal_at(x)
        return torch.cat([(2 * u).expand_as(log_var), u * log_var.exp()], dim=-1)


def is_diagonal_normal(dist) -> bool:
    """Whether `dist` is an Independent(Normal) (a diagonal Gaussian with event dim D)."""
    return isinstance(dist, Independent) and isinstance(dist.base_dist, Normal)


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
