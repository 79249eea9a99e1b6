"""Hypergradients dF/dφ of the bilevel problem, with torch.func, on flat parameter vectors.

    inner:  θ*(φ) = argmin_θ L(θ, φ),   L = -J (a differentiable Objective on the train split)
    outer:  F(φ)  = NLL(θ*(φ)) on the held-out split (per-sample mean, lower is better)

Implicit (IFT): dF/dφ = -∇²_φθ L · v with (C + δI) v = ∇_θ NLL, solved from curvature-vector
products by CG, MINRES, a Neumann series, or a dense solve. The curvature C is either the exact
Hessian ∇²_θθ L (double backward through one graph of ∇_θ L per outer step) or, for a diagonal
Gaussian predictor, the Gauss–Newton matrix J_θᵀ H_out J_θ: L is a convex function ℓ of the
outputs o = (mean, log-variance) (objectives.GaussianClosedForm.of_outputs), J_θ = ∂o/∂θ and
H_out = ∇²_o ℓ, so C is positive semi-definite for every θ and CG never meets negative
curvature. The two agree wherever o is linear in θ (∇²_θθ L = J_θᵀ H_out J_θ + Σ_o ∂ℓ/∂o ∇²_θ o).
Unrolled: θ_K = K gradient steps θ ← θ - η ∇_θ L from θ_0, F = NLL(θ_K), differentiated in φ.

θ [P] and φ [Q] are flat vectors; `BilevelProblem` maps them to the modules' parameters.
"""

from __future__ import annotations

from collections.abc import Collection
from functools import partial

import torch
from torch import nn
from torch.func import functional_call, grad, jacfwd, vjp, vmap

from mbrl_bilevel.data import Dataset
from mbrl_bilevel.solvers.linear import (
    LinearSolverConfig,
    SolveInfo,
    check_solution,
    conjugate_gradient,
    dense_solve,
    minres,
    neumann,
)
from mbrl_bilevel.solvers.objectives import Objective, is_diagonal_normal
from mbrl_bilevel.validation import ConfigError


class _Joint(nn.Module):
    def __init__(self, predictor: nn.Module, reward: nn.Module, objective: Objective):
        super().__init__()
        self.predictor, self.reward, self.objective = predictor, reward, objective

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.objective(self.predictor, self.reward, x, y)


class _OutputObjective(nn.Module):
    """J as a function of a diagonal Gaussian's outputs (the reward's parameters swappable)."""

    def __init__(self, reward: nn.Module, objective: Objective):
        super().__init__()
        self.reward, self.objective = reward, objective

    def forward(self, outputs: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mean, log_var = outputs.chunk(2, dim=-1)
        return self.objective.of_outputs(self.reward, mean, log_var, x, y)


def _named(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


class BilevelProblem:
    """The bilevel problem of one (predictor, reward, objective, train, val) as functions of flat
    θ [P] and φ [Q]. The modules are only read (`theta()`, `phi()`) or written (`set_theta`).
    `theta_names` restricts θ to those predictor parameters (e.g. the output layer: the other
    parameters stay fixed at their current values, a common cheap approximation of the IFT)."""

    def __init__(
        self,
        predictor: nn.Module,
        reward: nn.Module,
        objective: Objective,
        train: Dataset,
        val: Dataset,
        theta_names: Collection[str] | None = None,
    ):
        self.joint = _Joint(predictor, reward, objective)
        self.output_objective = _OutputObjective(reward, objective)
        self.predictor, self.reward, self.train, self.val = predictor, reward, train, val
        self.objective = objective
        chosen = [theta_names is None or name in theta_names for name, _ in _named(predictor)]
        self._theta = [pair for pair, keep in zip(_named(predictor), chosen, strict=True) if keep]
        if not self._theta:
            raise ValueError(f"no predictor parameter is named in {theta_names}")
        self._fixed = {  # the other parameters, detached: constants of the functional calls
            name: p.detach()
            for (name, p), keep in zip(_named(predictor), chosen, strict=True)
            if not keep
        }
        self._phi = _named(reward)

    @staticmethod
    def _flat(params) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for _, p in params])

    @staticmethod
    def _unflat(vector: torch.Tensor, params, prefix: str) -> dict[str, torch.Tensor]:
        out, start = {}, 0
        for name, p in params:
            out[prefix + name] = vector[start : start + p.numel()].view_as(p)
            start += p.numel()
        return out

    def theta(self) -> torch.Tensor:
        return self._flat(self._theta)

    def phi(self) -> torch.Tensor:
        return self._flat(self._phi)

    def theta_parts(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """A flat θ-shaped vector [P] as views shaped like the θ parameters, by name."""
        return self._unflat(vector, self._theta, "")

    def theta_flat(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The inverse of `theta_parts`: tensors shaped like the θ parameters, in order -> [P]."""
        return torch.cat([part.reshape(-1) for part in parts])

    def output_mixed(self, outputs: torch.Tensor, phi: torch.Tensor):
        """u [..., B, 2D] -> ∇_φ ⟨∂ℓ/∂o (o, φ), u⟩ [Q] at the outputs o: the mixed product
        ∇²_φθ L · v for u = J_θ v (exact, see `gauss_newton`)."""
        output_grad = grad(self.output_loss)
        _, mixed = vjp(lambda p: output_grad(outputs, p), phi.detach())
        return lambda u: mixed(u)[0].detach()

    @torch.no_grad()
    def set_theta(self, theta: torch.Tensor) -> None:
        for (_, p), value in zip(
            self._theta, self._unflat(theta, self._theta, "").values(), strict=True
        ):
            p.copy_(value)

    def set_phi_grad(self, hypergradient: torch.Tensor) -> None:
        """Write a flat dF/dφ [Q] into the reward parameters' .grad (for a torch optimiser)."""
        for (_, p), value in zip(
            self._phi, self._unflat(hypergradient, self._phi, "").values(), strict=True
        ):
            p.grad = value.detach().clone()

    def inner_loss(self, theta: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """L(θ, φ) = -J on the train split: scalar."""
        params = self._unflat(theta, self._theta, "predictor.")
        params |= {f"predictor.{name}": p for name, p in self._fixed.items()}
        params |= self._unflat(phi, self._phi, "reward.")
        return -functional_call(self.joint, params, (self.train.x, self.train.y))

    def outer_loss(self, theta: torch.Tensor) -> torch.Tensor:
        """F = held-out NLL per sample: scalar."""
        params = self._unflat(theta, self._theta, "") | self._fixed
        dist = functional_call(self.predictor, params, (self.val.x,))
        return -dist.log_prob(self.val.y).mean()

    def outputs(self, theta: torch.Tensor) -> torch.Tensor:
        """o = (mean, log-variance) of the predictor on the train split: [..., B, 2D], mean half
        first. Needs a diagonal Gaussian predictor (Independent Normal)."""
        params = self._unflat(theta, self._theta, "") | self._fixed
        dist = functional_call(self.predictor, params, (self.train.x,))
        if not is_diagonal_normal(dist):
            raise ConfigError(
                f"the Gauss–Newton curvature needs a diagonal Gaussian predictor, got {type(dist).__name__}"
            )
        return torch.cat([dist.mean, dist.variance.log()], dim=-1)

    def output_loss(self, outputs: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """ℓ(o, φ) = -J of the outputs o [..., B, 2D] on the train split: scalar. Needs an
        objective with `of_outputs` (GaussianClosedForm)."""
        params = self._unflat(phi, self._phi, "reward.")
        return -functional_call(
            self.output_objective, params, (outputs, self.train.x, self.train.y)
        )

    def inner_grad(self, theta: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """∇_θ L [P]."""
        return grad(self.inner_loss)(theta, phi)

    def second_order(self, theta: torch.Tensor, phi: torch.Tensor):
        """(v [P] -> ∇²_θθ L · v [P], v [P] -> ∇²_φθ L · v [Q]): reverse-over-reverse products
        that reuse one graph of ∇_θ L at (θ, φ) for every v (the Hessian is symmetric, so
        vᵀH = Hv). Each product walks only the graph's paths to its own variable, so the many
        θθ products of a linear solve never pay for the reward's side of the graph (torch.func's
        vjp would differentiate in both)."""
        theta, phi = theta.detach().requires_grad_(), phi.detach().requires_grad_()
        (gradient,) = torch.autograd.grad(self.inner_loss(theta, phi), theta, create_graph=True)

        def product(v: torch.Tensor, wrt: torch.Tensor) -> torch.Tensor:
            (value,) = torch.autograd.grad(
                gradient, wrt, v, retain_graph=True, materialize_grads=True
            )  # zeros where the graph does not reach `wrt`, as vjp's
            return value.detach()

        return partial(product, wrt=theta), partial(product, wrt=phi)

    def gauss_newton(self, theta: torch.Tensor, phi: torch.Tensor):
        """(v [P] -> J_θᵀ H_out J_θ v [P], v [P] -> ∇²_φθ L · v [Q]) at (θ, φ), from one forward
        pass: J_θᵀ w is the outputs' vjp, J_θ v the vjp of that (linear) vjp, H_out t a vjp of
        ∂ℓ/∂o in o. The mixed product is exact: ∇_θ L = J_θᵀ ∂ℓ/∂o and J_θ does not depend on φ,
        so ∇²_φθ L · v = ∇_φ ⟨∂ℓ/∂o, J_θ v⟩."""
        theta, phi = theta.detach(), phi.detach()
        outputs, pull = vjp(self.outputs, theta)
        _, push = vjp(pull, torch.zeros_like(outputs))
        output_grad = grad(self.output_loss)
        _, curvature = vjp(lambda o: output_grad(o, phi), outputs)
        mixed = self.output_mixed(outputs, phi)

        def jacobian(v: torch.Tensor) -> torch.Tensor:
            return push((v,))[0]

        def product(v: torch.Tensor) -> torch.Tensor:
            return pull(curvature(jacobian(v))[0])[0].detach()

        return product, lambda v: mixed(jacobian(v))

    def curvature(self, theta: torch.Tensor, phi: torch.Tensor, kind: str):
        """The (curvature product, mixed product) pair of `kind`: hessian (`second_order`) or
        gauss-newton (`gauss_newton`)."""
        if kind == "gauss-newton":
            return self.gauss_newton(theta, phi)
        return self.second_order(theta, phi)

    def hessian(self, theta: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """∇²_θθ L [P, P] (small problems only)."""
        return jacfwd(lambda t: self.inner_grad(t, phi))(theta)


def implicit_hypergradient(
    problem: BilevelProblem,
    theta: torch.Tensor,
    phi: torch.Tensor,
    config: LinearSolverConfig,
    warm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, SolveInfo]:
    """dF/dφ [Q] by the IFT at θ (assumed ≈ θ*(φ)). Returns (hypergradient, v [P], SolveInfo);
    pass the returned v as `warm` at the next call to warm-start CG or MINRES."""
    rhs = grad(problem.outer_loss)(theta)
    hessian_product, mixed_product = problem.curvature(theta, phi, config.curvature)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return hessian_product(v) + config.damping * v

    if config.method == "cg":
        v, info = conjugate_gradient(
            matvec,
            rhs,
            warm if config.warm_start else None,
            config.tol,
            config.max_iter,
            config.warn,
        )
    elif config.method == "minres":
        v, info = minres(
            matvec, rhs, warm if config.warm_start else None, config.tol, config.max_iter
        )
    elif config.method == "neumann":
        v, info = neumann(matvec, rhs, config.neumann_step, config.max_iter)
    else:
        if config.curvature == "gauss-newton":
            hessian = vmap(hessian_product)(torch.eye(len(theta)).to(theta))  # symmetric
        else:
            hessian = problem.hessian(theta, phi)
        v, info = dense_solve(hessian + config.damping * torch.eye(len(theta)).to(hessian), rhs)
    check_solution(v, info, config)
    return -mixed_product(v), v, info


def unrolled_hypergradient(
    problem: BilevelProblem, theta: torch.Tensor, phi: torch.Tensor, steps: int, lr: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """dF(θ_K(φ))/dφ [Q] through K = `steps` gradient steps of size `lr` from θ_0 = θ.
    Returns (hypergradient, θ_K detached). Memory grows linearly with K."""

    def unrolled(p: torch.Tensor):
        t = theta
        for _ in range(steps):
            t = t - lr * problem.inner_grad(t, p)
        return problem.outer_loss(t), t

    hypergradient, theta_k = grad(unrolled, has_aux=True)(phi)
    return hypergradient, theta_k.detach()


def solve_inner(
    problem: BilevelProblem,
    theta: torch.Tensor,
    phi: torch.Tensor,
    tol: float = 1e-10,
    max_iter: int = 100,
) -> tuple[torch.Tensor, float]:
    """θ*(φ) by damped Newton with backtracking (small problems, e.g. the float64 oracles).
    Returns (θ*, ‖∇_θ L(θ*)‖)."""
    loss = float(problem.inner_loss(theta, phi))
    for _ in range(max_iter):
        g = problem.inner_grad(theta, phi)
        if float(g.norm()) < tol:
            break
        hessian = problem.hessian(theta, phi)
        eye = torch.eye(len(theta)).to(hessian)
        shift = max(0.0, -float(torch.linalg.eigvalsh(hessian).min())) * 1.1
        step = torch.linalg.pinv(hessian + shift * eye, hermitian=True) @ g  # dead θ: singular
        size = 1.0
        while size > 1e-8:
            candidate = theta - size * step
            value = float(problem.inner_loss(candidate, phi))
            if value <= loss + 1e-12 * (1 + abs(loss)):  # rounding near the optimum
                theta, loss = candidate, value
                break
            size *= 0.5
        else:
            break
    return theta, float(problem.inner_grad(theta, phi).norm())
