"""The plug-in (heuristic) solver: PG under U = (λ/2)Σ̂⁻¹ (full), its diagonal, or the scalar
λd/(2 tr Σ̂)·I, with Σ̂ the covariance of the current model's residuals y - μ_θ(x) on a chosen
split, refreshed every K inner steps; plus the reference code's fixed choices for comparison.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from mbrl_bilevel.data import Dataset
from mbrl_bilevel.losses import PGLoss
from mbrl_bilevel.rewards import FixedMahalanobis
from mbrl_bilevel.solvers.inner import InnerSteps, UStar, final_metrics, log_row, outer_row
from mbrl_bilevel.validation import ConfigError, check_positive

log = logging.getLogger(__name__)

# residual-based (refreshed) kinds, then the reference's fixed ones (raw targets, computed once)
PLUGIN_KINDS = ("full", "diag", "scalar", "identity", "raw-scalar", "raw-full")


def shrink(sigma: torch.Tensor, max_condition: float) -> torch.Tensor:
    """(1-α)Σ̂ + α (tr Σ̂/D) I with the smallest α in [0, 1] that brings cond(Σ̂) <= max_condition.
    sigma [D, D] -> [D, D]; logs (INFO) when it shrinks: routine for dynamics residuals."""
    eig = torch.linalg.eigvalsh(sigma)
    low, high, target = float(eig[0]), float(eig[-1]), float(eig.mean())
    if low > 0 and high / low <= max_condition:
        return sigma
    c = max_condition
    alpha = min(1.0, (high - c * low) / (high - c * low + (c - 1) * target))
    log.info(
        "Σ̂ is ill-conditioned (eigenvalues %.3g..%.3g); shrinking towards (tr Σ̂/D)·I with α=%.3g",
        low,
        high,
        alpha,
    )
    return (1 - alpha) * sigma + alpha * target * torch.eye(len(sigma)).to(sigma)


@torch.no_grad()
def residual_covariance(predictor: nn.Module, data: Dataset) -> torch.Tensor:
    """Covariance [D, D] of y - μ_θ(x) over `data` (ensemble members pooled), mean-centred."""
    mean = predictor(data.x).mean
    residual = (data.y - mean).reshape(-1, data.y.shape[-1])
    residual = residual - residual.mean(0)
    return residual.T @ residual / max(len(residual) - 1, 1)


def floor_variances(sigma: torch.Tensor, predictor: nn.Module) -> torch.Tensor:
    """Σ̂ [D, D] with each variance raised to at least e × the smallest variance the predictor
    is built to reach (`min_variance()`, if it has one).

    A plug-in U = (λ/2)Σ̂⁻¹ then never asks PG for a variance below the model's lower bound. A
    target the model predicts almost exactly (Reacher's goal coordinates, constant within an
    episode) otherwise gets U ~ 1e6: PG's optimum lies beyond the bound, -J has no stationary
    point and most of the bilevel learner's IFT solves fail."""
    if not hasattr(predictor, "min_variance"):
        return sigma
    raised = (variance_floor(predictor) - sigma.diagonal()).clamp_min(0)
    return sigma + torch.diag(raised)


def variance_floor(predictor: nn.Module) -> float:
    """e × the predictor's `min_variance()`, the floor of floor_variances (0 without a bound)."""
    return math.e * predictor.min_variance() if hasattr(predictor, "min_variance") else 0.0


def plugin_ceiling(predictor: nn.Module, lam: float) -> float:
    """The largest diagonal plug-in entry that floor_variances allows: (λ/2)/variance_floor,
    inf for a predictor without a variance bound."""
    floor = variance_floor(predictor)
    return 0.5 * lam / floor if floor > 0 else math.inf


def plugin_matrix(kind: str, sigma: torch.Tensor, lam: float) -> torch.Tensor:
    """U [D, D] from Σ̂ [D, D]: full (λ/2)Σ̂⁻¹, diag (λ/2)/diag(Σ̂), scalar λD/(2 tr Σ̂)·I."""
    dim = sigma.shape[-1]
    if kind in ("full", "raw-full"):
        return 0.5 * lam * torch.linalg.inv(sigma)
    if kind == "diag":
        return torch.diag(0.5 * lam / sigma.diagonal())
    if kind in ("scalar", "raw-scalar"):
        return lam * dim / (2 * sigma.diagonal().sum()) * torch.eye(dim).to(sigma)
    raise ConfigError(f"unknown plug-in kind {kind!r}; choose one of {PLUGIN_KINDS}")


class PluginLearner:
    """fit(predictor, train, val) by PG with a plug-in reward.

    kind: full | diag | scalar (residual covariance on `split`, refreshed every `refresh_every`
    inner steps) or identity | raw-scalar | raw-full (the reference: U = I, or Σ̂ of the raw
    training targets, fixed). `steps` inner PG steps in total. After fit, `reward` holds the last
    U and `history` the rows logged at each refresh.
    """

    def __init__(
        self,
        kind: str,
        lam: float,
        steps: int,
        refresh_every: int = 50,
        lr: float = 1e-2,
        generations: int = 5,
        baseline: str = "mean",
        split: str = "val",
        max_condition: float = 1e6,
        u_star: UStar | None = None,
        writer=None,
        monitor=None,
    ):
        if kind not in PLUGIN_KINDS:
            raise ConfigError(f"unknown plug-in kind {kind!r}; choose one of {PLUGIN_KINDS}")
        if split not in ("train", "val"):
            raise ConfigError(f"plug-in split must be train or val, got {split!r}")
        if steps <= 0 or refresh_every <= 0:
            raise ConfigError("steps and refresh_every must be > 0")
        self.kind, self.lam, self.steps, self.refresh_every = (
            kind,
            check_positive(lam, "λ"),
            steps,
            refresh_every,
        )
        self.lr, self.generations, self.baseline, self.split = lr, generations, baseline, split
        self.max_condition, self.u_star, self.writer, self.monitor = (
            max_condition,
            u_star,
            writer,
            monitor,
        )
        self.reward: FixedMahalanobis | None = None
        self.history: list[dict[str, float]] = []

    def _estimate(self, predictor: nn.Module, train: Dataset, val: Dataset | None) -> torch.Tensor:
        if self.kind == "identity":
            return torch.eye(train.y.shape[-1]).to(train.y)
        if self.kind.startswith("raw-"):
            sigma = torch.cov(train.y.T).reshape(train.y.shape[-1], -1)
        else:
            sigma = residual_covariance(predictor, val if self.split == "val" else train)
        return plugin_matrix(self.kind, shrink(sigma, self.max_condition), self.lam)

    def fit(self, predictor: nn.Module, train: Dataset, val: Dataset | None) -> dict[str, float]:
        if self.split == "val" and (val is None or len(val) == 0):
            raise ConfigError(
                "the plug-in solver estimates Σ̂ on the held-out split, which is empty"
            )
        self.reward = FixedMahalanobis(self._estimate(predictor, train, val))
        loss = PGLoss(self.reward, self.lam, self.generations, self.baseline)
        inner = InnerSteps(predictor, loss, self.lr)
        fixed = self.kind in ("identity", "raw-scalar", "raw-full")
        done = 0
        while done < self.steps:
            steps = min(self.refresh_every, self.steps - done)
            inner.run(train, steps)
            done += steps
            if not fixed:
                self.reward.U.copy_(self._estimate(predictor, train, val))
            row = {"step": float(done)} | outer_row(predictor, self.reward, train, val, self.u_star)
            self.history.append(log_row(self.writer, row, self.monitor, predictor, self.reward))
        return final_metrics(self.history)
