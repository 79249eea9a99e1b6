"""The solvers inside the Gaussian study (`mbrl-bilevel gaussian --solver ... --reward ...`):
build the learner from a GaussianConfig, train it, compare the learned U with U* = (λ/2)Σ(x)⁻¹,
and plot U's entries over training (the paper's figure 3)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from mbrl_bilevel.data import Dataset
from mbrl_bilevel.gaussian import (
    GaussianConfig,
    SyntheticGaussian,
    closed_form_metrics,
    gaussian_entropy,
    optimal_reward_matrix,
    relative_frobenius,
)
from mbrl_bilevel.reporting import mean_std
from mbrl_bilevel.rewards import InputDependentMahalanobis, make_mahalanobis
from mbrl_bilevel.solvers.bilevel import INNER, BilevelLearner
from mbrl_bilevel.solvers.linear import METHODS as LINEAR_METHODS
from mbrl_bilevel.solvers.linear import LinearSolverConfig
from mbrl_bilevel.solvers.objectives import GaussianClosedForm
from mbrl_bilevel.solvers.plugin import PLUGIN_KINDS, PluginLearner
from mbrl_bilevel.validation import ConfigError, check_positive

SOLVERS = ("plugin", "implicit", "unrolled")
LEARNED_REWARDS = ("scalar", "diag", "full", "input")


def validate_solver_options(config: GaussianConfig) -> None:
    """Raise ConfigError on a bad --solver/--reward/... combination."""
    if config.solver not in SOLVERS:
        raise ConfigError(f"unknown --solver {config.solver!r}; choose one of {SOLVERS}")
    rewards = PLUGIN_KINDS if config.solver == "plugin" else LEARNED_REWARDS
    if config.reward not in rewards:
        raise ConfigError(
            f"--reward {config.reward!r} does not fit --solver {config.solver}; "
            f"choose one of {rewards}"
        )
    if config.inner_steps <= 0 or config.warmup_steps < 0 or config.val_inputs < 0:
        raise ConfigError("--inner-steps must be > 0, --warmup-steps and --val-inputs >= 0")
    if config.solver != "plugin" and config.warmup_steps + config.inner_steps > config.steps:
        raise ConfigError(
            f"--steps {config.steps} leaves no outer step after --warmup-steps "
            f"{config.warmup_steps} with --inner-steps {config.inner_steps}"
        )
    check_positive(config.outer_lr, "--outer-lr")
    check_positive(config.unroll_lr, "--unroll-lr")
    if config.linear_solver not in LINEAR_METHODS:
        raise ConfigError(
            f"unknown --linear-solver {config.linear_solver!r}; choose one of {LINEAR_METHODS}"
        )
    if config.inner not in INNER:
        raise ConfigError(f"unknown --inner {config.inner!r}; choose one of {INNER}")


def make_learner(config: GaussianConfig, problem: SyntheticGaussian, writer, monitor):
    """The solver's learner; learned rewards start at U = I; logs reward/u_star_error."""

    base = optimal_reward_matrix(problem.sigma, config.lam)

    def u_star(x: torch.Tensor) -> torch.Tensor:  # (λ/2)(s(x)Σ)⁻¹: [D, D] or [B, D, D]
        return base if problem.scale_fn is None else base / problem.scale_fn(x)[:, None, None]

    common = dict(
        generations=config.generations,
        baseline=config.baseline,
        u_star=u_star,
        writer=writer,
        monitor=monitor,
    )
    if config.solver == "plugin":
        return PluginLearner(
            config.reward, config.lam, config.steps, config.inner_steps, lr=config.lr, **common
        )
    eye = torch.eye(config.dim, dtype=torch.float64)
    reward = make_mahalanobis(config.reward, eye, in_dim=config.dim)
    return BilevelLearner(
        reward,
        GaussianClosedForm(config.lam),
        method=config.solver,
        outer_steps=(config.steps - config.warmup_steps) // config.inner_steps,
        inner_steps=config.inner_steps,
        inner_lr=config.lr,
        outer_lr=config.outer_lr,
        outer_lr_schedule="cosine",
        inner_lr_schedule=config.lr_schedule,
        inner=config.inner,
        linear=LinearSolverConfig(method=config.linear_solver, damping=config.damping),
        unroll_lr=config.unroll_lr,
        warmup_steps=config.warmup_steps,
        **common,
    )


def train_solver(
    model: torch.nn.Module,
    train: Dataset,
    val: Dataset,
    test: Dataset,
    problem: SyntheticGaussian,
    config: GaussianConfig,
    writer,
) -> tuple[list[dict[str, float]], dict]:
    """Fit `model` with the configured solver. Returns (history rows with the study's metrics,
    {U (None for U(x)), u_star_error, seconds (wall), cpu_seconds (this process),
    best_constant_nll}). best_constant_nll is the lowest test NLL of any model with one constant
    covariance, even given the true mean: the bound for PG under any constant U (SPEC section 2)."""
    learner = make_learner(
        config, problem, writer, lambda m: closed_form_metrics(m, test, problem, None)
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    learner.fit(model, train, val)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    reward = learner.reward
    constant = not isinstance(reward, InputDependentMahalanobis)
    residual = test.y - problem.mean_fn(test.x)
    best_constant = residual.T @ residual / len(residual)
    return learner.history, {
        "best_constant_nll": float(gaussian_entropy(best_constant)),
        "U": reward.matrix().detach().tolist() if constant else None,
        "u_star_error": learner.history[-1]["reward/u_star_error"],
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
    }


def report_solver(config: GaussianConfig, learned: list[dict], rows: list[dict], run_dir: Path):
    """summary.json's "solver" entry (learned U per seed, U*, relative Frobenius error mean ± std)
    and, for constant rewards, plots/u_entries.png (U's entries over steps vs U*)."""
    label = f"{config.solver}-{config.reward}"
    u_star = (
        None
        if config.noise == "hetero"
        else optimal_reward_matrix(config.resolved_sigma(), config.lam)
    )
    errors = [entry["u_star_error"] for entry in learned]
    if u_star is not None and learned[0]["U"] is not None:
        errors = [
            relative_frobenius(torch.tensor(e["U"], dtype=torch.float64), u_star) for e in learned
        ]
        from mbrl_bilevel.runs import save_figure
        from mbrl_bilevel.solvers.figures import plot_u_entries

        solver_rows = [row for row in rows if row["method"] == label]
        save_figure(plot_u_entries(solver_rows, u_star, label), run_dir / "plots" / "u_entries.png")
    mean, std = mean_std(errors)
    seconds = mean_std([entry["seconds"] for entry in learned])
    cpu_seconds = mean_std([entry["cpu_seconds"] for entry in learned])
    best_constant = mean_std([entry["best_constant_nll"] for entry in learned])
    return {
        "label": label,
        "U_learned": [entry["U"] for entry in learned],
        "U_star": None if u_star is None else u_star.tolist(),
        "rel_frobenius_error": errors,
        "rel_frobenius_error_mean": mean,
        "rel_frobenius_error_std": std,
        "error_definition": "‖U - U*‖_F / ‖U*‖_F"
        + (" averaged over held-out x" if u_star is None else ""),
        "fit_seconds_mean": seconds[0],
        "fit_seconds_std": seconds[1],
        "fit_cpu_seconds_mean": cpu_seconds[0],
        "fit_cpu_seconds_std": cpu_seconds[1],
        "best_constant_U_test_nll_mean": best_constant[0],
        "best_constant_U_test_nll_std": best_constant[1],
    }
