"""Predictors: nn.Modules whose forward(x [B, in]) returns a torch.distributions.Distribution.

Gaussian predictors return an event of dimension D (Independent Normal or MultivariateNormal);
categorical predictors return a Categorical over C classes. Forward passes are pure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.distributions import Categorical, Distribution, Independent, MultivariateNormal, Normal
from torch.nn import functional as F


def mlp(in_dim: int, out_dim: int, hidden: Sequence[int], activation: type[nn.Module] = nn.SiLU):
    """A plain MLP: Linear-activation blocks, then a Linear output layer."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), activation()]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


def soft_bound(value: torch.Tensor, low: float | torch.Tensor, high: float | torch.Tensor):
    """Softly clamp `value` into (low, high) with softplus, as in PETS: smooth, never flat."""
    value = high - F.softplus(high - value)
    return low + F.softplus(value - low)


def lower_cholesky(raw: torch.Tensor, dim: int, min_log: float, max_log: float) -> torch.Tensor:
    """Map raw [..., D(D+1)/2] (L's entries row by row) to a lower-triangular L [..., D, D] with
    a softly bounded exp diagonal. Only the D diagonal entries pass through exp, and the entries
    are placed by one index_copy (2-3× faster than a scatter plus tril and diag_embed)."""
    rows, cols = torch.tril_indices(dim, dim, device=raw.device)
    diagonal = (rows == cols).nonzero().squeeze(-1)
    bounded = soft_bound(raw.index_select(-1, diagonal), min_log, max_log).exp()
    entries = raw.index_copy(-1, diagonal, bounded)
    chol = raw.new_zeros(*raw.shape[:-1], dim * dim)
    return chol.index_copy_(-1, rows * dim + cols, entries).view(*raw.shape[:-1], dim, dim)


class GaussianMLP(nn.Module):
    """Diagonal Gaussian p(y|x) = N(μ(x), diag σ(x)²) with an input-dependent, softly bounded log σ."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden: Sequence[int] = (64, 64),
        min_log_std: float = -5.0,
        max_log_std: float = 2.0,
    ):
        super().__init__()
        self.out_dim = out_dim
        self.net = mlp(in_dim, 2 * out_dim, hidden)
        self.min_log_std, self.max_log_std = min_log_std, max_log_std

    def min_variance(self) -> float:
        """The smallest variance the model can reach: exp(2 · its lower log-std bound)."""
        return math.exp(2 * self.min_log_std)

    def output_layer_names(self) -> list[str]:
        """Names of the last linear layer's weight [2D, h] and bias [2D]."""
        last = len(self.net) - 1
        return [f"net.{last}.weight", f"net.{last}.bias"]

    def forward(self, x: torch.Tensor) -> Distribution:
        mean, raw = self.net(x).chunk(2, dim=-1)
        log_std = soft_bound(raw, self.min_log_std, self.max_log_std)
        return Independent(Normal(mean, log_std.exp(), validate_args=False), 1, validate_args=False)


class FullCovGaussianMLP(nn.Module):
    """Full-covariance Gaussian N(μ(x), L(x)L(x)ᵀ) with an input-dependent Cholesky factor."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden: Sequence[int] = (64, 64),
        min_log_std: float = -5.0,
        max_log_std: float = 2.0,
    ):
        super().__init__()
        self.out_dim = out_dim
        self.net = mlp(in_dim, out_dim + out_dim * (out_dim + 1) // 2, hidden)
        self.min_log_std, self.max_log_std = min_log_std, max_log_std

    def forward(self, x: torch.Tensor) -> Distribution:
        out = self.net(x)
        mean, raw = out[..., : self.out_dim], out[..., self.out_dim :]
        chol = lower_cholesky(raw, self.out_dim, self.min_log_std, self.max_log_std)
        return MultivariateNormal(mean, scale_tril=chol, validate_args=False)


class LinearGaussian(nn.Module):
    """N(Wx + b, S) with one learned covariance S for all inputs (full Cholesky or diagonal)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        covariance: str = "full",
        init_std: float = 1.0,
    ):
        super().__init__()
        if covariance not in ("full", "diag"):
            raise ValueError(f"covariance must be 'full' or 'diag', got {covariance!r}")
        self.out_dim, self.covariance = out_dim, covariance
        self.linear = nn.Linear(in_dim, out_dim)
        self.log_diag = nn.Parameter(torch.full((out_dim,), float(torch.tensor(init_std).log())))
        if covariance == "full":
            self.lower = nn.Parameter(torch.zeros(out_dim, out_dim))

    def cholesky(self) -> torch.Tensor:
        """L [D, D] with S = L Lᵀ."""
        diag = torch.diag(self.log_diag.exp())
        return diag + torch.tril(self.lower, -1) if self.covariance == "full" else diag

    def forward(self, x: torch.Tensor) -> Distribution:
        return MultivariateNormal(self.linear(x), scale_tril=self.cholesky(), validate_args=False)


class CategoricalLogistic(nn.Module):
    """Multiclass logistic regression: Categorical(logits = Wx + b)."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.linear = nn.Linear(in_dim, num_classes)

    def forward(self, x: torch.Tensor) -> Distribution:
        return Categorical(logits=self.linear(x), validate_args=False)


class CategoricalMLP(nn.Module):
    """Categorical(logits = MLP(x))."""

    def __init__(self, in_dim: int, num_classes: int, hidden: Sequence[int] = (64, 64)):
        super().__init__()
        self.num_classes = num_classes
        self.net = mlp(in_dim, num_classes, hidden)

    def forward(self, x: torch.Tensor) -> Distribution:
        return Categorical(logits=self.net(x), validate_args=False)


def covariance(dist: Distribution) -> torch.Tensor:
    """Covariance [..., D, D] of a Gaussian predictor's output distribution."""
    if isinstance(dist, MultivariateNormal):
        return dist.covariance_matrix
    if isinstance(dist, Independent) and isinstance(dist.base_dist, Normal):
        return torch.diag_embed(dist.base_dist.variance)
    raise TypeError(f"not a Gaussian distribution: {type(dist).__name__}")
