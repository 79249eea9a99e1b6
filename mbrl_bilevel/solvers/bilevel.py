"""The implicit-differentiation and unrolled solvers as a Learner: fit(predictor, train, val).

Each outer step: (implicit) K warm-started inner steps (REINFORCE PG by default), then the IFT
hypergradient of the held-out NLL from the differentiable objective; (unrolled) K differentiable
gradient steps on the differentiable objective, back-propagated. Then one step of the outer Adam,
whose state persists across outer steps and across calls of `fit`.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from mbrl_bilevel.data import Dataset
from mbrl_bilevel.losses import PGLoss
from mbrl_bilevel.solvers.hypergrad import (
    BilevelProblem,
    implicit_hypergradient,
    unrolled_hypergradient,
)
from mbrl_bilevel.solvers.inner import InnerSteps, UStar, final_metrics, log_row, outer_row
from mbrl_bilevel.solvers.linear import LinearSolverConfig
from mbrl_bilevel.solvers.objectives import Objective
from mbrl_bilevel.validation import ConfigError, check_positive

log = logging.getLogger(__name__)
METHODS = ("implicit", "unrolled")
INNER = ("pg", "exact")


class ObjectiveLoss:
    """The Loss -J(θ; φ) of a differentiable Objective (deterministic inner steps)."""

    def __init__(self, objective: Objective, reward: nn.Module):
        self.objective, self.reward = objective, reward

    def __call__(self, predictor: nn.Module, x: torch.Tensor, y: torch.Tensor):
        value = -self.objective(predictor, self.reward, x, y)
        return value, {"objective": -value.item()}


class BilevelLearner:
    """Learn the reward's parameters φ (any reward module: scalar, diag, Cholesky, U(x), one-hot)
    while fitting the predictor by PG under it.

    reward: the reward to learn, in place. objective: its differentiable J (objectives.py), with
    the entropy weight λ. method: implicit | unrolled. inner: pg (REINFORCE PGLoss with
    `generations` and `baseline`) | exact (Adam on -J); implicit only. outer_steps outer steps of
    `inner_steps` (K) inner steps each, after `warmup_steps` inner steps (θ near θ*(φ) before the
    first hypergradient, which the IFT assumes; pg/exact steps also for unrolled). unroll_lr: the step size of the unrolled gradient steps.
    u_star: x [B, in] -> U*(x) when known (logged as reward/u_star_error). monitor(predictor) ->
    extra metrics per outer step. After fit, `history` holds one row per outer step.
    """

    def __init__(
        self,
        reward: nn.Module,
        objective: Objective,
        method: str = "implicit",
        outer_steps: int = 100,
        inner_steps: int = 50,
        inner_lr: float = 1e-2,
        outer_lr: float = 1e-2,
        outer_lr_schedule: str = "constant",
        inner_lr_schedule: str = "constant",
        inner: str = "pg",
        generations: int = 5,
        baseline: str = "mean",
        linear: LinearSolverConfig | None = None,
        unroll_lr: float = 1e-2,
        warmup_steps: int = 0,
        u_star: UStar | None = None,
        writer=None,
        monitor=None,
    ):
        if method not in METHODS:
            raise ConfigError(f"unknown bilevel method {method!r}; choose one of {METHODS}")
        if inner not in INNER:
            raise ConfigError(f"unknown inner steps {inner!r}; choose one of {INNER}")
        if outer_steps <= 0 or inner_steps <= 0:
            raise ConfigError(
                f"outer and inner steps must be > 0, got {outer_steps}, {inner_steps}"
            )
        if warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {warmup_steps}")
        for schedule in (outer_lr_schedule, inner_lr_schedule):
            if schedule not in ("constant", "cosine"):
                raise ConfigError(
                    f"learning-rate schedules are constant or cosine, not {schedule!r}"
                )
        for value, name in (
            (inner_lr, "inner_lr"),
            (outer_lr, "outer_lr"),
            (unroll_lr, "unroll_lr"),
        ):
            check_positive(value, name)
        self.reward, self.objective, self.method = reward, objective, method
        self.outer_steps, self.inner_steps, self.inner_lr = outer_steps, inner_steps, inner_lr
        self.inner, self.generations, self.baseline = inner, generations, baseline
        self.linear, self.unroll_lr = linear or LinearSolverConfig(), unroll_lr
        self.warmup_steps, self.inner_lr_schedule = warmup_steps, inner_lr_schedule
        self.u_star, self.writer, self.monitor = u_star, writer, monitor
        self.outer_optimizer = torch.optim.Adam(reward.parameters(), lr=outer_lr)
        self.schedule = (
            torch.optim.lr_scheduler.CosineAnnealingLR(self.outer_optimizer, outer_steps)
            if outer_lr_schedule == "cosine"
            else None
        )
        self.history: list[dict[str, float]] = []
        self.outer_step = 0

    def _inner_loss(self):
        if self.inner == "pg":
            return PGLoss(self.reward, self.objective.lam, self.generations, self.baseline)
        return ObjectiveLoss(self.objective, self.reward)

    def fit(self, predictor: nn.Module, train: Dataset, val: Dataset | None) -> dict[str, float]:
        if val is None or len(val) == 0:
            raise ConfigError(
                "the bilevel solver needs a non-empty held-out split: its outer objective is the "
                "held-out NLL (on the training split, U would grow without bound)"
            )
        if len(train) == 0:
            raise ConfigError("the training split is empty")
        problem = BilevelProblem(predictor, self.reward, self.objective, train, val)
        total = self.warmup_steps + self.outer_steps * self.inner_steps
        cosine = total if self.inner_lr_schedule == "cosine" else None
        inner = InnerSteps(predictor, self._inner_loss(), self.inner_lr, cosine_steps=cosine)
        inner.run(train, self.warmup_steps)
        warm = None
        for _ in range(self.outer_steps):
            if self.method == "implicit":
                inner.run(train, self.inner_steps)
                row, warm = implicit_outer_step(
                    problem, self.outer_optimizer, self.linear, warm, self.outer_step + 1
                )
            else:
                hypergradient, theta = unrolled_hypergradient(
                    problem, problem.theta(), problem.phi(), self.inner_steps, self.unroll_lr
                )
                problem.set_theta(theta)
                row = {
                    "outer/hypergrad_norm": checked_norm(
                        hypergradient, "unrolled", self.outer_step + 1
                    )
                }
                apply_hypergradient(problem, self.outer_optimizer, hypergradient)
            if self.schedule is not None:
                self.schedule.step()
            self.outer_step += 1
            row = {
                "step": float(self.warmup_steps + self.outer_step * self.inner_steps),
                "outer_step": float(self.outer_step),
                **row,
                **outer_row(predictor, self.reward, train, val, self.u_star),
            }
            self.history.append(log_row(self.writer, row, self.monitor, predictor, self.reward))
        return final_metrics(self.history)


def apply_hypergradient(problem: BilevelProblem, optimizer, hypergradient: torch.Tensor) -> None:
    """One step of the outer optimiser along dF/dφ [Q]."""
    optimizer.zero_grad(set_to_none=True)
    problem.set_phi_grad(hypergradient)
    optimizer.step()


def checked_norm(hypergradient: torch.Tensor, method: str, index: int) -> float:
    """‖dF/dφ‖, or FloatingPointError naming the method and outer step when it is not finite."""
    norm = float(hypergradient.norm())
    if not math.isfinite(norm):
        raise FloatingPointError(
            f"the {method} hypergradient is not finite at outer step {index}; lower the "
            "learning rates or raise the damping"
        )
    return norm


def implicit_outer_step(
    problem: BilevelProblem,
    optimizer: torch.optim.Optimizer,
    linear: LinearSolverConfig,
    warm: torch.Tensor | None,
    index: int,
) -> tuple[dict[str, float], torch.Tensor | None]:
    """One implicit (IFT) outer step at the predictor's current θ: the hypergradient, then a step
    of `optimizer` on φ unless the linear solve is no better than v = 0 (relative residual >= 1:
    CG on an ill-conditioned or indefinite Hessian of -J; MINRES's never grows), which leaves φ
    and the optimiser's moments untouched and is logged at INFO (never printed by default).
    `warm` is the previous solution v [P]. Returns
    (solver/ and outer/ scalars, the v to warm-start the next solve, None after a failed one)."""
    hypergradient, v, info = implicit_hypergradient(
        problem, problem.theta(), problem.phi(), linear, warm
    )
    row = {"solver/residual": info.residual, "solver/iterations": float(info.iterations)}
    if info.residual >= 1.0:
        log.info(
            "outer step %d skipped: the linear solve's relative residual is %.3g, no better "
            "than v = 0 (CG on an ill-conditioned or indefinite Hessian of -J; MINRES's "
            "residual never grows)",
            index,
            info.residual,
        )
        return row | {"outer/hypergrad_norm": float(hypergradient.norm())}, None
    row["outer/hypergrad_norm"] = checked_norm(hypergradient, "implicit", index)
    apply_hypergradient(problem, optimizer, hypergradient)
    return row, (v if info.converged else None)
