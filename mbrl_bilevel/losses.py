"""Losses: __call__(predictor, x, y) -> (loss tensor to minimise, metrics dict of floats).

MSE and NLL work for any predictor (NLL of a Categorical is the cross-entropy). The PG losses
maximise J(θ) = E_data E_ŷ~p_θ(.|x) [r(ŷ, y)] + λ E_x H(p_θ(.|x)) with G generations per input.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mbrl_bilevel.validation import ConfigError, check_positive

BASELINES = ("none", "mean", "grpo", "min")


class MSELoss:
    """Mean squared error of the predicted mean, averaged over batch and output dims."""

    def __call__(self, predictor: nn.Module, x: torch.Tensor, y: torch.Tensor):
        mse = (predictor(x).mean - y).pow(2).mean()
        return mse, {"mse": mse.item()}


class NLLLoss:
    """Negative log-likelihood -log p_θ(y|x) per sample, constants included (cross-entropy for
    categorical predictors; diagonal or full covariance for Gaussian ones)."""

    def __call__(self, predictor: nn.Module, x: torch.Tensor, y: torch.Tensor):
        nll = -predictor(x).log_prob(y).mean()
        return nll, {"nll": nll.item()}


class BetaNLLLoss:
    """β-NLL (Seitzer et al. 2022) for diagonal Gaussian predictors: each dimension's NLL term
    weighted by its detached predicted variance to the power β (0: NLL, 1: MSE-like gradients
    for the mean). Averaged over batch and output dims."""

    def __init__(self, beta: float = 0.5):
        if not 0 <= beta <= 1:
            raise ConfigError(f"β of β-NLL must be in [0, 1], got {beta}")
        self.beta = beta

    def __call__(self, predictor: nn.Module, x: torch.Tensor, y: torch.Tensor):
        normal = predictor(x).base_dist  # Independent(Normal): per-dimension terms
        terms = -normal.log_prob(y)
        loss = (terms * normal.variance.detach().pow(self.beta)).mean()
        return loss, {"beta_nll": loss.item(), "nll": terms.sum(-1).mean().item()}


def subtract_baseline(reward: torch.Tensor, baseline: str) -> torch.Tensor:
    """Advantages [G, B] from rewards [G, B].

    - none: r.
    - mean: r_g minus the mean of the other G-1 rewards (leave-one-out): unbiased.
    - grpo: r_g minus the mean of all G rewards, as GRPO and the reference code do. It scales
      the reward term's gradient by (G-1)/G but not the entropy's, so PG then behaves as if
      λ were λ·G/(G-1): the optimum covariance is (λ/2)·G/(G-1)·U⁻¹.
    - min: r_g minus the group minimum (the reference's "normalize"); biased as well.
    """
    if baseline == "none":
        return reward
    if baseline == "mean":
        generations = reward.shape[0]
        return (reward - reward.mean(0, keepdim=True)) * (generations / (generations - 1))
    if baseline == "grpo":
        return reward - reward.mean(0, keepdim=True)
    if baseline == "min":
        return reward - reward.min(0, keepdim=True).values
    raise ConfigError(f"unknown baseline {baseline!r}; choose one of {BASELINES}")


class PGLoss:
    """Score-function (REINFORCE) estimate of -∇J with G generations per input.

    surrogate = mean_{g,b}[(r(ŷ_g, y) - b) log p_θ(ŷ_g|x)] + λ mean_b H(p_θ(.|x)), ŷ_g ~ p_θ
    detached, the entropy analytic. `clip_log_prob` clamps log p_θ(ŷ) into [-c, c].
    """

    def __init__(
        self,
        reward: nn.Module,
        lam: float,
        generations: int = 5,
        baseline: str = "mean",
        clip_log_prob: float | None = None,
    ):
        check_positive(lam, "entropy weight λ")
        if generations < 1:
            raise ConfigError(f"generations must be >= 1, got {generations}")
        if baseline not in BASELINES:
            raise ConfigError(f"unknown baseline {baseline!r}; choose one of {BASELINES}")
        if baseline != "none" and generations < 2:
            raise ConfigError(f"baseline {baseline!r} needs generations >= 2")
        self.reward, self.lam, self.generations = reward, lam, generations
        self.baseline, self.clip_log_prob = baseline, clip_log_prob

    def __call__(self, predictor: nn.Module, x: torch.Tensor, y: torch.Tensor):
        dist = predictor(x)
        y_hat = dist.sample((self.generations,))  # [G, B, D] or [G, B]
        with torch.no_grad():
            reward = self.reward(y_hat, y, x)  # [G, B]
        log_prob = dist.log_prob(y_hat)  # [G, B]
        if self.clip_log_prob is not None:
            log_prob = log_prob.clamp(-self.clip_log_prob, self.clip_log_prob)
        entropy = dist.entropy().mean()
        advantage = subtract_baseline(reward, self.baseline)
        loss = -((advantage * log_prob).mean() + self.lam * entropy)
        return loss, {"reward": reward.mean().item(), "entropy": entropy.item()}


class PathwisePGLoss:
    """Reparameterised estimate of -J for Gaussian predictors: ŷ = rsample, r differentiated."""

    def __init__(self, reward: nn.Module, lam: float, generations: int = 5):
        check_positive(lam, "entropy weight λ")
        self.reward, self.lam, self.generations = reward, lam, generations

    def __call__(self, predictor: nn.Module, x: torch.Tensor, y: torch.Tensor):
        dist = predictor(x)
        reward = self.reward(dist.rsample((self.generations,)), y, x).mean()
        entropy = dist.entropy().mean()
        loss = -(reward + self.lam * entropy)
        return loss, {"reward": reward.item(), "entropy": entropy.item()}


class BetaPGLoss:
    """β-weighted PG for diagonal Gaussian predictors under a diagonal, input-dependent reward
    r(ŷ, y, x) = Σ_d r_d with r_d = -u_d(x)(ŷ_d - y_d)² (`reward.per_dimension`,
    `reward.log_diagonal_at`). Every input's and dimension's term of J is weighted by
    w_d(x) = σ̂_d²(x)^β, σ̂_d²(x) = (λ/2)/u_d(x) the variance that term makes PG learn (detached):

        J_w = E_x Σ_d w_d(x) (E_ŷ r_d(ŷ, y, x) + λ H(p_θ,d(.|x))).

    A positive weight does not move a term's maximiser, so the inner optimum is still
    S(x) = (λ/2)U(x)⁻¹ and μ(x) = E[y|x] (SPEC 2); it changes how the terms share a finite
    model, as β-NLL (Seitzer et al. 2022) does for NLL. β = 0 is PG under U(x), whose mean
    gradient is weighted by U(x) as NLL's is by the inverse variance; β = 1 gives the mean MSE's
    uniform weights. `estimator` pathwise differentiates r_d of reparameterised samples; score is
    REINFORCE per dimension with a leave-one-out baseline per dimension (the dimensions of a
    diagonal Gaussian are independent, so each r_d needs only its own log-probability).
    """

    def __init__(
        self,
        reward: nn.Module,
        lam: float,
        generations: int = 5,
        beta: float = 0.5,
        estimator: str = "pathwise",
    ):
        check_positive(lam, "entropy weight λ")
        if not 0 <= beta <= 1:
            raise ConfigError(f"β of the β-weighted PG must be in [0, 1], got {beta}")
        if estimator not in ("score", "pathwise"):
            raise ConfigError(f"unknown PG estimator {estimator!r}; choose score or pathwise")
        if generations < (2 if estimator == "score" else 1):
            raise ConfigError(f"generations must be >= 2 (score) or >= 1, got {generations}")
        self.reward, self.lam, self.generations = reward, lam, generations
        self.beta, self.estimator = beta, estimator

    def __call__(self, predictor: nn.Module, x: torch.Tensor, y: torch.Tensor):
        normal = predictor(x).base_dist  # Independent(Normal) -> per-dimension Normal [.., B, D]
        with torch.no_grad():
            log_variance = math.log(0.5 * self.lam) - self.reward.log_diagonal_at(x)
            weight = (self.beta * log_variance).exp()
        if self.estimator == "pathwise":
            reward = self.reward.per_dimension(normal.rsample((self.generations,)), y, x)
            expected = reward.mean(0)
        else:
            y_hat = normal.sample((self.generations,))
            with torch.no_grad():
                reward = self.reward.per_dimension(y_hat, y, x)
            advantage = subtract_baseline(reward, "mean")
            expected = (advantage * normal.log_prob(y_hat)).mean(0)
        entropy = normal.entropy()
        loss = -(weight * (expected + self.lam * entropy)).sum(-1).mean()
        return loss, {
            "reward": reward.sum(-1).mean().item(),
            "entropy": entropy.sum(-1).mean().item(),
        }
