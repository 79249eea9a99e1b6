"""`mbrl-bilevel bench solvers`: the cost of one outer step of each solver as a ratio to one inner
PG step, measured in one process (candidates interleaved, medians over repeats), so the ratios
hold on a loaded machine even when absolute times do not.

An outer step of the plug-in and implicit solvers is K inner PG steps plus the work timed here
(a refresh of U; a hypergradient); an unrolled outer step is entirely the work timed here."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mbrl_bilevel.gaussian import SyntheticGaussian
from mbrl_bilevel.losses import PGLoss
from mbrl_bilevel.models import FullCovGaussianMLP, LinearGaussian
from mbrl_bilevel.rewards import make_mahalanobis
from mbrl_bilevel.solvers.hypergrad import (
    BilevelProblem,
    implicit_hypergradient,
    unrolled_hypergradient,
)
from mbrl_bilevel.solvers.linear import LinearSolverConfig
from mbrl_bilevel.solvers.objectives import GaussianClosedForm
from mbrl_bilevel.solvers.plugin import plugin_matrix, residual_covariance
from mbrl_bilevel.validation import ConfigError


@dataclass(frozen=True)
class SolverBenchConfig:
    """Sizes of the solver benchmark."""

    n: int = 2000
    """Rows of the train and of the held-out split."""
    dim: int = 3
    """Output dimension D (Σ = a fixed non-diagonal SPD matrix)."""
    model: str = "linear"
    """Predictor: linear (LinearGaussian, full covariance) or mlp (FullCovGaussianMLP [64, 64])."""
    reward: str = "full"
    """Reward parametrisation: scalar, diag or full."""
    inner_steps: int = 10
    """K of the unrolled solver (its outer step runs K differentiable inner steps)."""
    cg_iterations: int = 10
    """CG iterations per implicit outer step (tol 0, so exactly this many)."""
    repeats: int = 7
    """Timed repeats per candidate (the median is reported)."""
    threads: int = 1
    """Torch threads."""

    def validate(self) -> None:
        if min(self.n, self.dim, self.inner_steps, self.cg_iterations, self.repeats) <= 0:
            raise ConfigError("n, dim, inner_steps, cg_iterations and repeats must be > 0")
        if self.model not in ("linear", "mlp") or self.reward not in ("scalar", "diag", "full"):
            raise ConfigError("--model must be linear or mlp; --reward scalar, diag or full")


def candidates(config: SolverBenchConfig) -> tuple[dict[str, Callable[[], object]], int]:
    """{name: one call} for the inner PG step and each solver's outer-step work; and P = |θ|."""
    A = torch.randn(config.dim, config.dim, generator=torch.Generator().manual_seed(0))
    sigma = (A @ A.T + 0.5 * torch.eye(config.dim)).double()
    data = SyntheticGaussian(sigma)
    generator = torch.Generator().manual_seed(0)
    train, val = data.sample(config.n, 1, generator), data.sample(config.n, 1, generator)
    torch.manual_seed(0)
    if config.model == "linear":
        predictor = LinearGaussian(config.dim, config.dim).double()
    else:
        predictor = FullCovGaussianMLP(config.dim, config.dim).double()
    reward = make_mahalanobis(config.reward, torch.eye(config.dim, dtype=torch.float64))
    problem = BilevelProblem(predictor, reward, GaussianClosedForm(0.7), train, val)
    theta, phi = problem.theta(), problem.phi()
    loss = PGLoss(reward, 0.7, generations=5)
    optimizer = torch.optim.Adam(predictor.parameters(), lr=1e-9)

    def inner_pg_step():
        value, _ = loss(predictor, train.x, train.y)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()

    def implicit(method: str, **kwargs):
        config_ = LinearSolverConfig(method=method, tol=1e-30, damping=1e-3, **kwargs)
        return lambda: implicit_hypergradient(problem, theta, phi, config_)

    def plugin_refresh():
        return plugin_matrix("full", residual_covariance(predictor, val), 0.7)

    calls = {
        "inner PG step (REINFORCE, G=5)": inner_pg_step,
        "plug-in refresh (residual Σ̂, full)": plugin_refresh,
        f"implicit hypergradient, CG x{config.cg_iterations}": implicit(
            "cg", max_iter=config.cg_iterations
        ),
        f"implicit hypergradient, Neumann x{config.cg_iterations}": implicit(
            "neumann", max_iter=config.cg_iterations
        ),
        f"unrolled outer step, K={config.inner_steps}": lambda: unrolled_hypergradient(
            problem, theta, phi, config.inner_steps, 1e-3
        ),
    }
    if len(theta) <= 200:
        calls["implicit hypergradient, dense solve"] = implicit("dense")
    return calls, len(theta)


def run_solver_bench(config: SolverBenchConfig) -> tuple[list[dict], dict]:
    """Median seconds per candidate and its ratio to the inner PG step; plus the context."""
    import logging

    config.validate()
    torch.set_num_threads(config.threads)
    calls, params = candidates(config)
    times: dict[str, list[float]] = {name: [] for name in calls}
    logger = logging.getLogger("mbrl_bilevel.solvers.linear")
    level = logger.level
    logger.setLevel(logging.ERROR)  # the solves are capped on purpose: no "did not converge"
    try:
        for call in calls.values():
            call()  # warm-up
        load_before = os.getloadavg()
        for _ in range(config.repeats):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    finally:
        logger.setLevel(level)
    base = statistics.median(next(iter(times.values())))
    rows = [
        {
            "candidate": name,
            "median_ms": 1e3 * statistics.median(values),
            "ratio_to_inner_step": statistics.median(values) / base,
        }
        for name, values in times.items()
    ]
    context = {
        "theta_params": params,
        "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]],
        "cpu_count": os.cpu_count(),
        "threads": config.threads,
    }
    return rows, context
