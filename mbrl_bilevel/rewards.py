"""Reward modules r_φ(ŷ, y): higher is better; their parameters are the φ of the outer loop.

Every Mahalanobis reward computes r(ŷ, y) = -(ŷ - y)ᵀ U (ŷ - y) for ŷ of shape [B, D] or
[G, B, D] and y of shape [B, D]; `matrix()` returns U [D, D] and `matrix_at(x)` the matrix used
at inputs x [B, in]: U [D, D] for constant rewards, U(x) [B, D, D] for input-dependent ones.
"""

from __future__ import annotations

import torch
from torch import nn

from mbrl_bilevel.models import lower_cholesky, mlp, soft_bound
from mbrl_bilevel.validation import ConfigError, check_positive, check_spd


def quadratic_form(diff: torch.Tensor, matrix: torch.Tensor, factor: bool = False) -> torch.Tensor:
    """dᵀ U d over the last dim. diff [..., B, D], matrix [D, D] or [B, D, D] -> [..., B]. With
    `factor`, matrix is a factor L of U = L Lᵀ, and dᵀ U d = ‖dᵀ L‖² (U is never formed).

    A per-row matrix [*batch, D, D] (batch dims broadcasting with diff's trailing ones) is never
    copied for diff's leading sample dims S: the rows become [*batch, S, D] and one batched
    matmul per row of U takes them all (an expanded U was 12× slower for S = 5 samples).
    """
    lead = diff.dim() - (matrix.dim() - 1)
    if matrix.dim() == 2 or lead <= 0:
        rows, samples = diff.unsqueeze(-2), None  # [..., B, 1, D]
    else:
        samples = diff.shape[:lead]
        rows = diff.reshape(-1, *diff.shape[lead:]).movedim(0, -2)  # [*batch, S, D]
    product = rows @ matrix
    value = (product.pow(2) if factor else product * rows).sum(-1)
    if samples is None:
        return value.squeeze(-1)
    return value.movedim(-1, 0).reshape(*samples, *value.shape[:-1])


class MahalanobisReward(nn.Module):
    """Base class: subclasses define `matrix()`, the SPD matrix U [D, D]."""

    dim: int
    diagonal = False
    """Whether U (or every U(x)) is diagonal by construction."""

    def matrix(self) -> torch.Tensor:
        raise NotImplementedError

    def matrix_at(self, x: torch.Tensor | None) -> torch.Tensor:
        """U at inputs x [B, in]: [D, D] here (constant), [B, D, D] for input-dependent rewards."""
        return self.matrix()

    def diagonal_at(self, x: torch.Tensor | None) -> torch.Tensor:
        """diag U at inputs x [B, in]: [D] for constant rewards, [B, D] for input-dependent ones."""
        return self.matrix_at(x).diagonal(dim1=-2, dim2=-1)

    def forward(
        self, y_hat: torch.Tensor, y: torch.Tensor, x: torch.Tensor | None = None
    ) -> torch.Tensor:
        """y_hat [B, D] or [G, B, D], y [B, D] -> r [B] or [G, B]."""
        return -quadratic_form(y_hat - y, self.matrix_at(x))

    def expected(
        self,
        mean: torch.Tensor,
        variance: torch.Tensor,
        y: torch.Tensor,
        x: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """E r(ŷ, y) for ŷ ~ N(mean, diag(variance)): -(μ - y)ᵀU(μ - y) - Σ_d U_dd var_d.
        mean, variance [..., B, D], y [B, D] -> [..., B]."""
        U = self.matrix_at(x)
        return -quadratic_form(mean - y, U) - (U.diagonal(dim1=-2, dim2=-1) * variance).sum(-1)


class FixedMahalanobis(MahalanobisReward):
    """U given once (a buffer, no parameters)."""

    def __init__(self, matrix: torch.Tensor):
        super().__init__()
        check_spd(matrix, "reward matrix U")
        self.dim = matrix.shape[0]
        self.register_buffer("U", matrix.clone())

    def matrix(self) -> torch.Tensor:
        return self.U


class ScalarMahalanobis(MahalanobisReward):
    """U = u·I with u = exp(log_u) learnable."""

    diagonal = True

    def __init__(self, dim: int, scale: float = 1.0):
        super().__init__()
        check_positive(scale, "reward scale u")
        self.dim = dim
        self.log_scale = nn.Parameter(torch.tensor(float(scale)).log())

    def matrix(self) -> torch.Tensor:
        return self.log_scale.exp() * torch.eye(self.dim, dtype=self.log_scale.dtype)


class DiagonalMahalanobis(MahalanobisReward):
    """U = diag(exp(log_diag)) with log_diag [D] learnable."""

    diagonal = True

    def __init__(self, diagonal: torch.Tensor):
        super().__init__()
        if diagonal.ndim != 1 or not (diagonal > 0).all():
            raise ConfigError(f"reward diagonal must be a positive vector, got {diagonal}")
        self.dim = diagonal.shape[0]
        self.log_diag = nn.Parameter(diagonal.log().clone())

    def matrix(self) -> torch.Tensor:
        return torch.diag(self.log_diag.exp())

    @torch.no_grad()
    def rescale(self, log_factor: torch.Tensor) -> None:
        """U <- S U S with S = diag(exp(log_factor / 2)), log_factor [D]."""
        self.log_diag.add_(log_factor.to(self.log_diag))

    @torch.no_grad()
    def clamp_log(self, lower: torch.Tensor, upper: torch.Tensor) -> None:
        """Project log diag U into [lower, upper] (each [D])."""
        self.log_diag.clamp_(lower, upper)

    @torch.no_grad()
    def set_constant(self, matrix: torch.Tensor) -> None:
        """Move φ so that U = diag(matrix) ([D, D], SPD)."""
        check_spd(matrix, "reward matrix U")
        self.log_diag.copy_(matrix.diagonal().log())


class CholeskyMahalanobis(MahalanobisReward):
    """U = L Lᵀ, L lower triangular with a positive (exp) diagonal; full SPD and learnable."""

    def __init__(self, matrix: torch.Tensor):
        super().__init__()
        check_spd(matrix, "initial reward matrix U")
        self.dim = matrix.shape[0]
        chol = torch.linalg.cholesky(matrix)
        self.log_diag = nn.Parameter(chol.diagonal().log().clone())
        self.lower = nn.Parameter(torch.tril(chol, -1).clone())

    def cholesky(self) -> torch.Tensor:
        """L [D, D]."""
        return torch.tril(self.lower, -1) + torch.diag(self.log_diag.exp())

    def matrix(self) -> torch.Tensor:
        chol = self.cholesky()
        return chol @ chol.T


class InputDependentMahalanobis(MahalanobisReward):
    """U(x) = L(x) L(x)ᵀ with L(x) from a small MLP (positive, softly bounded diagonal).

    The output layer starts at zero weights, so U(x) ≈ `initial` for every x at first.
    `matrix()` (no input) is not defined; use `matrix_at(x)` -> [B, D, D]. The MLP sees
    (x - input_mean) / input_std, statistics set only by `fit_normaliser` (identity until then).
    """

    def __init__(
        self,
        in_dim: int,
        initial: torch.Tensor,
        hidden: tuple[int, ...] = (32,),
        min_log: float = -8.0,
        max_log: float = 8.0,
    ):
        super().__init__()
        check_spd(initial, "initial reward matrix U")
        self.dim = initial.shape[0]
        self.min_log, self.max_log = min_log, max_log
        self.net = mlp(in_dim, self.outputs(self.dim), hidden)
        self.set_constant(initial)
        self.register_buffer("input_mean", torch.zeros(in_dim))
        self.register_buffer("input_std", torch.ones(in_dim))

    @staticmethod
    def outputs(dim: int) -> int:
        """Width of the MLP's output: the D(D+1)/2 entries of L(x)."""
        return dim * (dim + 1) // 2

    def raw(self, x: torch.Tensor | None) -> torch.Tensor:
        """The MLP's output at inputs x [..., in] (normalised here) -> [..., outputs]."""
        if x is None:
            raise ConfigError("an input-dependent reward needs the inputs x")
        return self.net((x - self.input_mean) / self.input_std)

    @torch.no_grad()
    def set_constant(self, matrix: torch.Tensor) -> None:
        """Move φ so that U(x) = matrix [D, D] (SPD) at every x: zero output weights."""
        check_spd(matrix, "reward matrix U")
        chol = torch.linalg.cholesky(matrix.to(self.net[-1].bias))
        rows, cols = torch.tril_indices(self.dim, self.dim)
        self.net[-1].weight.zero_()
        self.net[-1].bias.copy_(torch.where(rows == cols, chol[rows, cols].log(), chol[rows, cols]))

    @torch.no_grad()
    def rescale(self, log_factor: torch.Tensor) -> None:
        """U(x) <- S U(x) S at every x, S = diag(exp(log_factor / 2)), log_factor [D]: row i of
        L(x) scaled by S_ii (the diagonal through a shift of its raw log, which the soft bounds
        bend slightly: within 1% for log-diagonals well inside them)."""
        rows, cols = torch.tril_indices(self.dim, self.dim)
        layer, half = self.net[-1], 0.5 * log_factor.to(self.net[-1].bias)
        off = rows != cols
        layer.weight[off] *= half[rows[off]].exp()[:, None]
        layer.bias[off] *= half[rows[off]].exp()
        layer.bias[~off] += half[rows[~off]]

    def fit_normaliser(self, x: torch.Tensor) -> None:
        """Set the input statistics from x [N, in] (constant columns get std 1)."""
        std = x.std(0)
        self.input_mean.copy_(x.mean(0))
        self.input_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def matrix(self) -> torch.Tensor:
        raise ConfigError("an input-dependent reward has no single matrix; call matrix_at(x)")

    def cholesky_at(self, x: torch.Tensor | None) -> torch.Tensor:
        """L(x) [..., D, D] (lower triangular, U(x) = L(x) L(x)ᵀ) at inputs x [..., in]."""
        return lower_cholesky(self.raw(x), self.dim, self.min_log, self.max_log)

    def matrix_at(self, x: torch.Tensor | None) -> torch.Tensor:
        chol = self.cholesky_at(x)
        return chol @ chol.transpose(-2, -1)

    def forward(
        self, y_hat: torch.Tensor, y: torch.Tensor, x: torch.Tensor | None = None
    ) -> torch.Tensor:
        return -quadratic_form(y_hat - y, self.cholesky_at(x), factor=True)

    def expected(
        self,
        mean: torch.Tensor,
        variance: torch.Tensor,
        y: torch.Tensor,
        x: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """As the base class's, from L(x): U_dd is the squared norm of row d of L(x)."""
        chol = self.cholesky_at(x)
        trace = (chol.pow(2).sum(-1) * variance).sum(-1)
        return -quadratic_form(mean - y, chol, factor=True) - trace


class DiagonalInputMahalanobis(InputDependentMahalanobis):
    """U(x) = diag(exp(log_u(x))): the MLP gives log_u(x) [..., D] (softly bounded in
    (min_log, max_log)), the diagonal U(x) of a diagonal Gaussian model. Cheaper than the Cholesky
    variant: D outputs, and forward never builds [B, D, D] matrices."""

    diagonal = True

    def __init__(
        self,
        in_dim: int,
        initial: torch.Tensor,
        hidden: tuple[int, ...] = (32,),
        min_log: float = -16.0,
        max_log: float = 16.0,
    ):
        super().__init__(in_dim, initial, hidden, min_log, max_log)

    @staticmethod
    def outputs(dim: int) -> int:
        return dim

    @torch.no_grad()
    def set_constant(self, matrix: torch.Tensor) -> None:
        """Move φ so that U(x) = diag(matrix) ([D, D], SPD) at every x: zero output weights."""
        check_spd(matrix, "reward matrix U")
        self.net[-1].weight.zero_()
        self.net[-1].bias.copy_(matrix.diagonal().log())

    @torch.no_grad()
    def rescale(self, log_factor: torch.Tensor) -> None:
        """U(x) <- S U(x) S at every x, S = diag(exp(log_factor / 2)), log_factor [D]: log u(x)
        shifted through the output layer's bias (bent slightly by the soft bounds: within 1% for
        log-diagonals well inside them)."""
        self.net[-1].bias.add_(log_factor.to(self.net[-1].bias))

    def log_diagonal_at(self, x: torch.Tensor | None) -> torch.Tensor:
        """log diag U(x) [..., D] at inputs x [..., in]."""
        return soft_bound(self.raw(x), self.min_log, self.max_log)

    def matrix_at(self, x: torch.Tensor | None) -> torch.Tensor:
        return torch.diag_embed(self.log_diagonal_at(x).exp())

    def diagonal_at(self, x: torch.Tensor | None) -> torch.Tensor:
        return self.log_diagonal_at(x).exp()

    def per_dimension(
        self, y_hat: torch.Tensor, y: torch.Tensor, x: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The reward's terms -u_d(x)(ŷ_d - y_d)² [..., D]; forward is their sum."""
        return -(y_hat - y).pow(2) * self.log_diagonal_at(x).exp()

    def forward(
        self, y_hat: torch.Tensor, y: torch.Tensor, x: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.per_dimension(y_hat, y, x).sum(-1)

    def expected(
        self,
        mean: torch.Tensor,
        variance: torch.Tensor,
        y: torch.Tensor,
        x: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """As the base class's: -Σ_d u_d(x)((μ_d - y_d)² + var_d), no [D, D] matrix."""
        return -(((mean - y).pow(2) + variance) * self.log_diagonal_at(x).exp()).sum(-1)


class OneHotReward(nn.Module):
    """Mahalanobis reward on one-hot class vectors: r(ŷ, y) = -(e_ŷ - e_y)ᵀ U (e_ŷ - e_y).

    ŷ: class indices [B] or [G, B]; y: class indices [B]. With U = βI, r = -2β·[ŷ ≠ y].
    """

    def __init__(self, base: MahalanobisReward):
        super().__init__()
        self.base = base
        self.num_classes = base.dim

    def matrix(self) -> torch.Tensor:
        return self.base.matrix()

    def matrix_at(self, x: torch.Tensor | None) -> torch.Tensor:
        """The base reward's U at inputs x (the solvers' diagnostics call it)."""
        return self.base.matrix_at(x)

    def pairwise(self) -> torch.Tensor:
        """Reward table R [C, C] with R[k, j] = r(ŷ = k, y = j)."""
        U = self.base.matrix()
        d = U.diagonal()
        return -(d[:, None] + d[None, :] - U - U.T)

    def forward(
        self, y_hat: torch.Tensor, y: torch.Tensor, x: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.pairwise()[y_hat.long(), y.long()]


def make_mahalanobis(kind: str, initial: torch.Tensor, in_dim: int = 0) -> MahalanobisReward:
    """Build a reward of `kind` in {fixed, scalar, diag, full, input} starting at U = initial
    [D, D], with parameters of initial's dtype; `input` (U(x)) needs the input dimension."""
    check_spd(initial, "initial reward matrix U")
    dim = initial.shape[0]
    if kind == "input":
        if in_dim <= 0:
            raise ConfigError(f"an input-dependent reward needs in_dim > 0, got {in_dim}")
        reward = InputDependentMahalanobis(in_dim, initial)
    elif kind == "fixed":
        reward = FixedMahalanobis(initial)
    elif kind == "scalar":
        reward = ScalarMahalanobis(dim, float(initial.diagonal().mean()))
    elif kind == "diag":
        reward = DiagonalMahalanobis(initial.diagonal().clone())
    elif kind == "full":
        reward = CholeskyMahalanobis(initial)
    else:
        raise ConfigError(
            f"unknown reward kind {kind!r}; choose fixed, scalar, diag, full or input"
        )
    return reward.to(initial.dtype)
