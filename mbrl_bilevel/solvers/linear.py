"""Solvers of A v = b for the symmetric A = C + δI (C the Hessian ∇²_θθ(-J) or its Gauss–Newton
matrix), given only the product v -> A v (curvature-vector products) or, for small problems, A
itself. CG needs A positive definite; MINRES (scipy's) only symmetric, and its residual never
grows from one iteration to the next.

Each returns (v, SolveInfo). A solve that misses its tolerance logs a warning with the residual;
a non-finite result raises FloatingPointError (never a silent NaN).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse.linalg
import torch

from mbrl_bilevel.validation import ConfigError

log = logging.getLogger(__name__)
MatVec = Callable[[torch.Tensor], torch.Tensor]
METHODS = ("cg", "minres", "neumann", "dense")
CURVATURES = ("hessian", "gauss-newton")


@dataclass(frozen=True)
class LinearSolverConfig:
    """How the IFT linear system (H + δI) v = ∇_θ F is solved."""

    method: str = "cg"
    """cg (conjugate gradients), minres (minimum residual: for an ill-conditioned or indefinite
    Hessian), neumann (truncated series) or dense (exact; small θ only)."""
    damping: float = 1e-4
    """δ added to the Hessian's diagonal (>= 0)."""
    tol: float = 1e-4
    """Stop when ‖b - A v‖ <= tol·‖b‖ (cg, minres)."""
    max_iter: int = 50
    """Iteration cap (cg, minres) or number of series terms (neumann)."""
    warm_start: bool = True
    """Start cg or minres from the previous outer step's solution."""
    neumann_step: float = 0.1
    """α in v = α Σ_k (I - αA)^k b; needs α < 2 / λ_max(A) to converge."""
    warn: bool = True
    """Log a warning when a solve misses its tolerance or meets negative curvature (off when the
    caller records the residual itself, e.g. as a TensorBoard scalar)."""
    curvature: str = "hessian"
    """The matrix of the system: hessian (the exact ∇²_θθ(-J)) or gauss-newton (J_θᵀ H_out J_θ,
    positive semi-definite for any θ; diagonal Gaussian predictors, GaussianClosedForm)."""

    def __post_init__(self):
        if self.curvature not in CURVATURES:
            raise ConfigError(f"unknown curvature {self.curvature!r}; choose one of {CURVATURES}")
        if self.method not in METHODS:
            raise ConfigError(f"unknown linear solver {self.method!r}; choose one of {METHODS}")
        if not (self.damping >= 0 and math.isfinite(self.damping)):
            raise ConfigError(f"damping must be a finite number >= 0, got {self.damping}")
        if not self.tol > 0 or self.max_iter < 1 or not self.neumann_step > 0:
            raise ConfigError("tol and neumann_step must be > 0 and max_iter >= 1")


@dataclass
class SolveInfo:
    residual: float
    """Relative residual ‖b - A v‖ / ‖b‖ of the returned v."""
    iterations: int
    converged: bool


def conjugate_gradient(
    matvec: MatVec,
    b: torch.Tensor,
    x0: torch.Tensor | None,
    tol: float,
    max_iter: int,
    warn: bool = True,
) -> tuple[torch.Tensor, SolveInfo]:
    """CG for SPD A, from x0 (zeros if None). b, x0 [P] -> v [P]."""
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    b_norm = float(b.norm())
    if b_norm == 0:
        return torch.zeros_like(b), SolveInfo(0.0, 0, True)
    r = b - matvec(x) if x0 is not None else b.clone()
    p, rs = r.clone(), r.dot(r)
    iterations = 0
    while iterations < max_iter and float(rs.sqrt()) > tol * b_norm:
        Ap = matvec(p)
        curvature = p.dot(Ap)
        if not math.isfinite(float(curvature)):
            raise FloatingPointError(f"CG: the Hessian-vector product is not finite ({curvature})")
        if not float(curvature) > 0:
            if warn:
                log.warning(
                    "CG met non-positive curvature %.3g (Hessian not SPD)", float(curvature)
                )
            break
        alpha = rs / curvature
        x, r = x + alpha * p, r - alpha * Ap
        rs_new = r.dot(r)
        p, rs = r + (rs_new / rs) * p, rs_new
        iterations += 1
    return x, SolveInfo(float(rs.sqrt()) / b_norm, iterations, float(rs.sqrt()) <= tol * b_norm)


def minres(
    matvec: MatVec, b: torch.Tensor, x0: torch.Tensor | None, tol: float, max_iter: int
) -> tuple[torch.Tensor, SolveInfo]:
    """scipy's MINRES for symmetric A (definite or not), from x0 (zeros if None), in float64.
    b, x0 [P] -> v [P]. Costs max_iter + 2 products: the start's residual and the final one."""
    b_norm = float(b.norm())
    if b_norm == 0:
        return torch.zeros_like(b), SolveInfo(0.0, 0, True)
    operator = scipy.sparse.linalg.LinearOperator(
        (len(b), len(b)),
        lambda v: matvec(torch.as_tensor(v, dtype=b.dtype)).double().numpy(),
        dtype=np.float64,
    )
    iterations = 0

    def count(_) -> None:
        nonlocal iterations
        iterations += 1

    solution, _ = scipy.sparse.linalg.minres(
        operator,
        b.double().numpy(),
        x0=None if x0 is None else x0.double().numpy(),
        rtol=1e-3 * tol,  # scipy's test is relative to ‖A‖‖x‖ + ‖b‖, looser than ‖b‖
        maxiter=max_iter,
        callback=count,
    )
    v = torch.as_tensor(solution, dtype=b.dtype)
    residual = float((b - matvec(v)).norm()) / b_norm
    if not math.isfinite(residual):
        raise FloatingPointError(f"MINRES: the Hessian-vector product is not finite ({residual})")
    return v, SolveInfo(residual, iterations, residual <= tol)


def neumann(
    matvec: MatVec, b: torch.Tensor, step: float, terms: int
) -> tuple[torch.Tensor, SolveInfo]:
    """v = α Σ_{k<terms} (I - αA)^k b, a truncated series for A⁻¹ b."""
    term, total = b.clone(), b.clone()
    for _ in range(terms - 1):
        term = term - step * matvec(term)
        total = total + term
    v = step * total
    residual = float((b - matvec(v)).norm()) / max(float(b.norm()), 1e-300)
    return v, SolveInfo(residual, terms, residual <= 1e-2)


def dense_solve(matrix: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, SolveInfo]:
    """Exact v = A⁻¹ b with A [P, P] materialised (the oracle for small problems); the minimum-norm
    least-squares solution (pseudo-inverse) when A is singular (parameters that J does not depend on)."""
    v = torch.linalg.pinv(matrix, hermitian=True) @ b
    residual = float((b - matrix @ v).norm()) / max(float(b.norm()), 1e-300)
    return v, SolveInfo(residual, 1, True)


def check_solution(v: torch.Tensor, info: SolveInfo, config: LinearSolverConfig) -> None:
    """Raise on a non-finite solution; warn (with the residual) when the solve missed its target."""
    if not torch.isfinite(v).all() or not math.isfinite(info.residual):
        raise FloatingPointError(
            f"the {config.method} linear solve returned non-finite values "
            f"(residual {info.residual}); increase damping or reduce the outer learning rate"
        )
    if not info.converged and config.warn:
        log.warning(
            "%s linear solve did not converge: relative residual %.3g after %d iterations "
            "(tol %.1g); the hypergradient is approximate",
            config.method,
            info.residual,
            info.iterations,
            config.tol,
        )
