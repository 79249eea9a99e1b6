"""The implicit outer step on an ensemble's output layer: its Gauss–Newton system, solved block by
block, a stationarity test, and the step itself (`output_layer_outer_step`).

θ is the last layer of NormalisedTargets(GaussianEnsemble): weights W [E, H, K] and biases
b [E, 1, K], K = 2D (D means, then D raw log-variances). Member e maps its trunk features h_eb [H]
at input b to z_ebk = h_eb·W_e[:, k] + b_ek, and each output o_ebk (mean, log-variance) depends on
z_ebk alone (o = z for a mean, the soft bound of z for a log-variance). L = -J is the mean over
the E·B (member, input) pairs of ℓ(o_eb), and for a diagonal reward ∇²_o ℓ is diagonal with
entries c (objectives.GaussianClosedForm.output_curvature: 2U_d for a mean, U_d e^{s_d} for a
log-variance). The Gauss–Newton matrix J_θᵀ ∇²_o L J_θ is then block-diagonal, one (H+1)×(H+1)
block per member and output:

    A_ek = Σ_b w_ebk f_eb f_ebᵀ + δ_ek I,   f_eb = (h_eb, 1),   w_ebk = c_ebk (∂o_ebk/∂z_ebk)² / (E·B),

positive definite by construction. δ_ek = damping · tr(A_ek - δ_ek I)/(H+1): Levenberg–Marquardt
damping relative to each block's mean curvature (directions the rows do not determine, e.g.
fewer rows than features, get curvature δ instead of 0).

Solve: conjugate gradients on every block at once, each with its own step sizes, preconditioned
by M_ek = a_ek G_e + δ_ek I with G_e = Σ_b f_eb f_ebᵀ (the member's feature Gram, through its
eigendecomposition in float64) and a_ek = tr(A_ek - δ_ek I)/tr(G_e). M_ek = A_ek wherever w_ek is
the same for every row (the mean heads under a constant U: one iteration); otherwise the
preconditioned blocks' condition number is at most max_b w_ebk / min_b w_ebk. The correlated
features and rewards spanning orders of magnitude across outputs, which left unpreconditioned CG
on the whole output layer with relative residuals above 1 (docs/results/bilevel.md), cancel out.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.func import grad, grad_and_value, jvp, vmap

from mbrl_bilevel.solvers.bilevel import apply_hypergradient, checked_norm
from mbrl_bilevel.solvers.hypergrad import BilevelProblem
from mbrl_bilevel.solvers.linear import LinearSolverConfig, SolveInfo
from mbrl_bilevel.validation import ConfigError


class OutputLayerSystem:
    """The damped Gauss–Newton matrix A of L = -J in θ = the output layer (see the module
    docstring), on the train split of `problem` (built with θ = predictor.output_layer_names()),
    at θ [P] and the reward's current φ. Vectors are flat [P] as the problem's θ, or blocks
    [E, H+1, K] (row H is the bias)."""

    def __init__(self, problem: BilevelProblem, theta: torch.Tensor, damping: float = 1e-3):
        weight, bias = problem.theta_parts(theta).values()
        if weight.dim() != 3 or bias.shape != (weight.shape[0], 1, weight.shape[2]):
            raise ConfigError(
                "the output-layer system needs θ = a stacked linear layer (weights [E, H, K], "
                "biases [E, 1, K]): build the problem with predictor.output_layer_names()"
            )
        self.problem, self.shape = problem, (weight.shape[0], weight.shape[1] + 1, weight.shape[2])
        self.dims = weight.shape[2] // 2
        with torch.no_grad():
            features = problem.predictor.ensemble.trunk(problem.train.x)
            self.features = torch.cat([features, torch.ones_like(features[..., :1])], dim=-1)
        ones = problem.theta_flat([torch.zeros_like(weight), torch.ones_like(bias)])
        self.outputs, self.slope = (t.detach() for t in jvp(problem.outputs, (theta,), (ones,)))
        log_var = self.outputs.chunk(2, dim=-1)[1]
        curvature = problem.objective.output_curvature(problem.reward, log_var, problem.train.x)
        pairs = self.outputs.numel() // self.outputs.shape[-1]
        self.weights = (curvature * self.slope.pow(2)).detach() / pairs  # w [E, B, K]
        norms = self.features.pow(2).sum(-1, keepdim=True)  # ‖f_eb‖² [E, B, 1]
        trace = (self.weights * norms).sum(1)  # tr(A_ek - δ I) [E, K]
        self.damping = damping * trace / self.shape[1]  # δ_ek [E, K]
        self._preconditioner(trace / norms.sum(1))

    def _preconditioner(self, scale: torch.Tensor) -> None:
        """M_ek = a_ek G_e + δ_ek I through G_e = Q Λ Qᵀ (float64); scale: a [E, K]."""
        gram = self.features.double().transpose(1, 2) @ self.features.double()
        eigenvalues, vectors = torch.linalg.eigh(gram)
        diagonal = scale.double()[:, None, :] * eigenvalues.clamp_min(0)[:, :, None]
        inverse = 1 / (diagonal + self.damping.double()[:, None, :])  # [E, H+1, K]
        self.inverse_spectrum = inverse.to(self.features.dtype)
        self.eigenvectors = vectors.to(self.features.dtype)

    def blocks(self, vector: torch.Tensor) -> torch.Tensor:
        """Flat θ-shaped [P] -> blocks [E, H+1, K]."""
        weight, bias = self.problem.theta_parts(vector).values()
        return torch.cat([weight, bias], dim=1)

    def flat(self, blocks: torch.Tensor) -> torch.Tensor:
        """Blocks [E, H+1, K] -> flat [P]."""
        return self.problem.theta_flat([blocks[:, :-1], blocks[:, -1:]])

    def jacobian(self, blocks: torch.Tensor) -> torch.Tensor:
        """J_θ V: the outputs' change [E, B, K] along blocks V [E, H+1, K]."""
        return self.slope * (self.features @ blocks)

    def transpose(self, outputs: torch.Tensor) -> torch.Tensor:
        """J_θᵀ w: blocks [E, H+1, K] from an output-space vector w [E, B, K]."""
        return self.features.transpose(1, 2) @ (self.slope * outputs)

    def inner_grad(self, phi: torch.Tensor) -> torch.Tensor:
        """∇_θ L at this θ for the reward parameters φ [Q]: J_θᵀ ∂ℓ/∂o, flat [P] (no pass
        through the trunk)."""
        return self.flat(self.transpose(grad(self.problem.output_loss)(self.outputs, phi)))

    def mixed(self, v: torch.Tensor) -> torch.Tensor:
        """∇²_φθ L · v [Q] at this θ and the reward's φ, for a flat v [P]."""
        tangent = self.jacobian(self.blocks(v))
        return self.problem.output_mixed(self.outputs, self.problem.phi())(tangent)

    def product(self, blocks: torch.Tensor) -> torch.Tensor:
        """A V for V [E, H+1, K, R] (R right-hand sides) -> [E, H+1, K, R]."""
        E, H1, K, R = blocks.shape
        rows = (self.features @ blocks.reshape(E, H1, K * R)).view(E, -1, K, R)
        rows = rows * self.weights[..., None]
        curvature = self.features.transpose(1, 2) @ rows.reshape(E, -1, K * R)
        return curvature.view(E, H1, K, R) + self.damping[:, None, :, None] * blocks

    def precondition(self, blocks: torch.Tensor) -> torch.Tensor:
        """M⁻¹ V for V [E, H+1, K, R]."""
        E, H1, K, R = blocks.shape
        rotated = (self.eigenvectors.transpose(1, 2) @ blocks.reshape(E, H1, K * R)).view(
            E, H1, K, R
        )
        scaled = (rotated * self.inverse_spectrum[..., None]).reshape(E, H1, K * R)
        return (self.eigenvectors @ scaled).view(E, H1, K, R)

    def solve(
        self, rhs: list[torch.Tensor], tol: float = 1e-4, max_iter: int = 50
    ) -> tuple[list[torch.Tensor], SolveInfo]:
        """A⁻¹ b for each flat b [P] in `rhs`, by block-wise preconditioned CG from 0, until every
        right-hand side's relative residual ‖b - A v‖/‖b‖ is at most `tol` or after `max_iter`
        iterations. Returns the flat solutions and the worst relative residual."""
        b = torch.stack([self.blocks(r) for r in rhs], dim=-1)  # [E, H+1, K, R]
        norms = b.pow(2).sum((0, 1, 2)).sqrt().clamp_min(1e-30)  # [R]
        x, r = torch.zeros_like(b), b.clone()
        z = self.precondition(r)
        p, rz = z, (r * z).sum(1, keepdim=True)
        iterations = 0
        while iterations < max_iter and _relative(r, norms) > tol:
            ap = self.product(p)
            curvature = (p * ap).sum(1, keepdim=True)
            alpha = torch.where(curvature > 0, rz / curvature, torch.zeros_like(rz))
            x, r = x + alpha * p, r - alpha * ap
            z = self.precondition(r)
            rz_new = (r * z).sum(1, keepdim=True)
            p = z + torch.where(rz > 0, rz_new / rz, torch.zeros_like(rz)) * p
            rz, iterations = rz_new, iterations + 1
        residual = _relative(b - self.product(x), norms)
        if not math.isfinite(residual):
            raise FloatingPointError(f"the output-layer solve is not finite (residual {residual})")
        info = SolveInfo(residual, iterations, residual <= tol)
        return [self.flat(x[..., i]) for i in range(x.shape[-1])], info


def _relative(residual: torch.Tensor, norms: torch.Tensor) -> float:
    """The worst ‖r‖/‖b‖ over the right-hand sides (residual [E, H+1, K, R], norms [R])."""
    return float((residual.pow(2).sum((0, 1, 2)).sqrt() / norms).max())


class DenseSystem:
    """The same damped Gauss–Newton matrix for any diagonal Gaussian predictor and θ (e.g. the
    output layer of a single GaussianMLP, the paper protocol's model), materialised from the
    torch.func products (`BilevelProblem.gauss_newton`, in chunks of `chunk` columns) and solved
    by Cholesky: A = C + δI, δ = damping · tr(C)/P. For small θ only (P² entries)."""

    def __init__(
        self, problem: BilevelProblem, theta: torch.Tensor, damping: float, chunk: int = 256
    ):
        self.problem, self.theta = problem, theta
        product, self._mixed = problem.gauss_newton(theta, problem.phi())
        eye = torch.eye(len(theta), dtype=theta.dtype)
        matrix = vmap(product, chunk_size=chunk)(eye)  # symmetric
        self.matrix = matrix + damping * matrix.trace() / len(theta) * eye
        self.factor = torch.linalg.cholesky(self.matrix.double())
        self.dims = problem.outputs(theta).shape[-1] // 2

    def inner_grad(self, phi: torch.Tensor) -> torch.Tensor:
        return self.problem.inner_grad(self.theta, phi).detach()

    def mixed(self, v: torch.Tensor) -> torch.Tensor:
        return self._mixed(v)

    def solve(
        self, rhs: list[torch.Tensor], tol: float = 1e-4, max_iter: int = 50
    ) -> tuple[list[torch.Tensor], SolveInfo]:
        """A⁻¹ b for each b [P] in `rhs` (exact; tol and max_iter unused), with the worst
        relative residual."""
        b = torch.stack(rhs, dim=1)
        x = torch.cholesky_solve(b.double(), self.factor).to(b)
        residual = float(((b - self.matrix @ x).norm(dim=0) / b.norm(dim=0).clamp_min(1e-30)).max())
        return list(x.T), SolveInfo(residual, 1, residual <= tol)


def curvature_system(problem: BilevelProblem, theta: torch.Tensor, damping: float):
    """OutputLayerSystem for an ensemble's stacked output layer (`predictor.ensemble`), else
    DenseSystem."""
    if hasattr(problem.predictor, "ensemble"):
        return OutputLayerSystem(problem, theta, damping)
    return DenseSystem(problem, theta, damping)


SKIP_REASONS = ("not_stationary", "solve_failed")
"""Why an outer step is skipped: the inner problem is not near its optimum for the current φ (the
outer gap test), or the linear solve missed its residual bound."""


def newton_point(
    problem: BilevelProblem, theta: torch.Tensor, linear: LinearSolverConfig, steps: int
) -> tuple[torch.Tensor, OutputLayerSystem | DenseSystem]:
    """θ after `steps` damped Gauss–Newton steps θ <- θ - t A⁻¹∇_θL on the output layer (the
    step size t halved until L decreases, at most 10 times), and the system at that θ: the exact
    inner solve of the mean heads (L is quadratic in them) and a Newton solve of the convex
    log-variance heads, on the problem's train rows, for the reward's current φ."""
    phi = problem.phi()
    system = curvature_system(problem, theta, linear.damping)
    for _ in range(steps):
        (step,), _ = system.solve([system.inner_grad(phi)], linear.tol, linear.max_iter)
        loss, size = float(problem.inner_loss(theta, phi).detach()), 1.0
        for _ in range(10):
            if float(problem.inner_loss(theta - size * step, phi).detach()) < loss:
                break
            size *= 0.5
        else:
            break
        theta = theta - size * step
        system = curvature_system(problem, theta, linear.damping)
    return theta, system


def output_layer_outer_step(
    problem: BilevelProblem,
    optimizer: torch.optim.Optimizer,
    linear: LinearSolverConfig,
    stationarity: float,
    max_residual: float,
    index: int,
    inner_steps: int = 0,
    project: Callable[[], None] | None = None,
) -> tuple[dict[str, float], str | None]:
    """One implicit outer step on the output layer, at θ = the predictor's output layer after
    `inner_steps` Gauss–Newton steps of the inner problem (`newton_point`; 0: the predictor's own,
    which stays unchanged either way): solve A v = ∇_θ F and A n = ∇_θ L together
    (`curvature_system`, `linear`'s damping, tol and max_iter), then

    - skip ("solve_failed") when the worst relative residual exceeds `max_residual`;
    - skip ("not_stationary") when the outer gap |∇_θFᵀ A⁻¹ ∇_θL| / D, the first-order change of
      the held-out NLL per dimension if θ moved to the inner problem's Gauss–Newton point
      θ - A⁻¹∇_θL, exceeds `stationarity` (nat/dim): the IFT's θ = θ*(φ) is then too far off
      for its hypergradient to be trusted;
    - otherwise step `optimizer` along dF/dφ = -∇²_φθ L · v (exact mixed term), call `project`
      (bounds on φ), and predict the outer objective after the step at the inner problem's
      linear response θ - A⁻¹(∇_θL(θ, φ_new) - ∇_θL(θ, φ)).

    `index` numbers the step in error messages. Returns (scalars: solver/residual,
    solver/iterations, solver/outer_gap, solver/newton_decrement (½ ∇_θLᵀ A⁻¹ ∇_θL / (λD)),
    solver/inner_lag (F at the predictor's θ minus F at the θ used), outer/objective_before and,
    for a step taken, outer/hypergrad_norm and outer/objective_after, objectives per dimension
    on the held-out rows; the skip reason or None)."""
    if linear.method != "cg":
        raise ConfigError(f"the output-layer system is solved by CG, not {linear.method!r}")
    own, phi = problem.theta(), problem.phi()
    theta, system = newton_point(problem, own, linear, inner_steps)
    inner = system.inner_grad(phi)
    outer, value = (t.detach() for t in grad_and_value(problem.outer_loss)(theta))
    (v, newton), info = system.solve([outer, inner], linear.tol, linear.max_iter)
    dims = system.dims
    before = float(value) / dims
    own_value = value if inner_steps == 0 else problem.outer_loss(own).detach()
    row = {
        "solver/residual": info.residual,
        "solver/iterations": float(info.iterations),
        "solver/outer_gap": float(outer @ newton) / dims,
        "solver/newton_decrement": 0.5 * float(inner @ newton) / (problem.objective.lam * dims),
        "solver/inner_lag": float(own_value) / dims - before,
        "outer/objective_before": before,
    }
    if info.residual > max_residual:
        return row, "solve_failed"
    if abs(row["solver/outer_gap"]) > stationarity:
        return row, "not_stationary"
    hypergradient = -system.mixed(v)
    row["outer/hypergrad_norm"] = checked_norm(hypergradient, "implicit", index)
    apply_hypergradient(problem, optimizer, hypergradient)
    if project is not None:
        project()
    response = system.inner_grad(problem.phi()) - inner
    (shift,), _ = system.solve([response], linear.tol, linear.max_iter)
    row["outer/objective_after"] = float(problem.outer_loss(theta - shift).detach()) / dims
    return row, None
