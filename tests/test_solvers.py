"""The solvers' building blocks and bad-input handling (fast)."""

import logging
import math

import pytest
import torch

from mbrl_bilevel.data import Dataset
from mbrl_bilevel.gaussian import SyntheticGaussian, optimal_reward_matrix
from mbrl_bilevel.models import CategoricalLogistic, LinearGaussian
from mbrl_bilevel.rewards import (
    DiagonalMahalanobis,
    InputDependentMahalanobis,
    OneHotReward,
    make_mahalanobis,
)
from mbrl_bilevel.solvers import (
    BilevelLearner,
    BilevelProblem,
    CategoricalExact,
    GaussianClosedForm,
    LinearSolverConfig,
    Pathwise,
    PluginLearner,
    implicit_hypergradient,
    solve_inner,
)
from mbrl_bilevel.solvers.linear import check_solution, conjugate_gradient, minres, neumann
from mbrl_bilevel.solvers.plugin import plugin_matrix, shrink
from mbrl_bilevel.validation import ConfigError

LAM = 0.7


def spd(dim, seed=0, shift=0.5):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    return A @ A.T + shift * torch.eye(dim, dtype=torch.float64)


def gaussian_data(sigma, n=200, seed=0, scale_fn=None):
    problem = SyntheticGaussian(sigma, scale_fn=scale_fn)
    g = torch.Generator().manual_seed(seed)
    return problem.sample(n, 1, g), problem.sample(n, 1, g)


class Recorder:
    """A stand-in SummaryWriter that records scalar names."""

    def __init__(self):
        self.names = set()

    def add_scalar(self, name, value, step):
        assert math.isfinite(value), name
        self.names.add(name)


# ---------------------------------------------------------------- linear solvers


def test_cg_and_neumann_solve_an_spd_system():
    A, b = spd(6), torch.randn(6, dtype=torch.float64)
    exact = torch.linalg.solve(A, b)
    v, info = conjugate_gradient(lambda v: A @ v, b, None, tol=1e-10, max_iter=50)
    assert info.converged and info.iterations <= 6 + 2
    assert torch.allclose(v, exact, atol=1e-8)
    step = 1 / float(torch.linalg.eigvalsh(A).max())
    v, info = neumann(lambda v: A @ v, b, step, 5000)
    assert torch.allclose(v, exact, atol=1e-6) and info.residual < 1e-6


def test_cg_warm_start_from_the_solution_needs_no_iteration():
    A, b = spd(6), torch.randn(6, dtype=torch.float64)
    _, info = conjugate_gradient(lambda v: A @ v, b, torch.linalg.solve(A, b), 1e-8, 50)
    assert info.iterations == 0 and info.converged


def test_minres_solves_symmetric_systems_definite_or_not():
    A, b = spd(6), torch.randn(6, dtype=torch.float64)
    indefinite = A - 3.0 * torch.eye(6, dtype=torch.float64)
    eigenvalues = torch.linalg.eigvalsh(indefinite)
    assert eigenvalues.min() < 0 < eigenvalues.max()
    for matrix in (A, indefinite):
        v, info = minres(lambda v, m=matrix: m @ v, b, None, tol=1e-10, max_iter=50)
        assert info.converged and info.residual < 1e-10
        assert torch.allclose(v, torch.linalg.solve(matrix, b), atol=1e-8)
    _, info = conjugate_gradient(lambda v: indefinite @ v, b, None, 1e-10, 50, warn=False)
    assert not info.converged  # CG stops at the first direction of negative curvature
    _, info = minres(lambda v: A @ v, b, torch.linalg.solve(A, b), 1e-8, 50)
    assert info.iterations <= 1 and info.converged  # a warm start at the solution


def test_minres_residual_never_grows_where_cgs_does():
    """Condition number 1e6: CG's residual after 1-10 iterations is 2.5-3.3 times ‖b‖ (worse than
    v = 0, so an outer step would be skipped); MINRES's decreases from the first iteration."""
    A = torch.diag(torch.logspace(0, 6, 30, dtype=torch.float64))
    b = torch.ones(30, dtype=torch.float64)
    previous = 1.0
    for iterations in range(1, 11):
        _, cg = conjugate_gradient(lambda v: A @ v, b, None, 1e-12, iterations, warn=False)
        _, mr = minres(lambda v: A @ v, b, None, 1e-12, iterations)
        assert cg.residual > 1 and mr.residual < previous, (iterations, cg, mr)
        assert mr.iterations == iterations
        previous = mr.residual


def test_cg_that_does_not_converge_logs_its_residual(caplog):
    A = torch.diag(torch.logspace(0, 6, 30, dtype=torch.float64))
    b = torch.ones(30, dtype=torch.float64)
    config = LinearSolverConfig(method="cg", tol=1e-10, max_iter=3)
    v, info = conjugate_gradient(lambda v: A @ v, b, None, config.tol, config.max_iter)
    assert not info.converged
    with caplog.at_level(logging.WARNING):
        check_solution(v, info, config)
    assert "did not converge" in caplog.text and f"{info.residual:.3g}" in caplog.text


def test_non_finite_solution_raises_instead_of_returning_nan():
    with pytest.raises(FloatingPointError, match="not finite"):
        conjugate_gradient(lambda v: v * float("nan"), torch.ones(3), None, 1e-6, 5)
    with pytest.raises(FloatingPointError, match="not finite"):
        minres(lambda v: v * float("nan"), torch.ones(3), None, 1e-6, 5)
    v = torch.tensor([1.0, float("nan")])
    with pytest.raises(FloatingPointError, match="non-finite"):
        check_solution(v, neumann(lambda v: v, v, 0.5, 3)[1], LinearSolverConfig(method="neumann"))


@pytest.mark.parametrize(
    "kwargs", [{"method": "magic"}, {"damping": -1.0}, {"tol": 0.0}, {"max_iter": 0}]
)
def test_bad_linear_solver_options(kwargs):
    with pytest.raises(ConfigError):
        LinearSolverConfig(**kwargs)


# ---------------------------------------------------------------- objectives


def test_pathwise_objective_approaches_the_closed_form(sigma3, reward_matrix3):
    train, _ = gaussian_data(sigma3)
    torch.manual_seed(0)
    model = LinearGaussian(3, 3).double()
    reward = make_mahalanobis("full", reward_matrix3).double()
    exact = GaussianClosedForm(LAM)(model, reward, train.x, train.y)
    estimate = Pathwise(LAM, generations=2000)(model, reward, train.x, train.y)
    assert abs(float(estimate - exact)) < 0.02 * abs(float(exact))
    again = Pathwise(LAM, generations=2000)(model, reward, train.x, train.y)
    assert float(again) == float(estimate)  # fixed noise: one deterministic function


def test_categorical_objective_is_the_exact_expectation():
    torch.manual_seed(0)
    model = CategoricalLogistic(2, 3).double()
    reward = OneHotReward(DiagonalMahalanobis(torch.tensor([0.5, 1.0, 2.0]))).double()
    x, y = torch.randn(5, 2, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
    dist = model(x)
    expected = (
        sum(dist.probs[:, k] * reward(torch.full((5,), k), y) for k in range(3))
        + LAM * dist.entropy()
    )
    assert torch.allclose(CategoricalExact(LAM)(model, reward, x, y), expected.mean())


def test_categorical_implicit_hypergradient_matches_finite_differences():
    """The hook the tabular study uses: exact sum over classes, diagonal one-hot reward."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(80, 2, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.7 * torch.randn(80, generator=g, dtype=torch.float64) > 0).long()
    y = y + (x[:, 1] > 0.8).long()
    train, val = Dataset(x[:40], y[:40]), Dataset(x[40:], y[40:])
    torch.manual_seed(0)
    model = CategoricalLogistic(2, 3).double()
    reward = OneHotReward(DiagonalMahalanobis(torch.tensor([0.8, 1.0, 1.3]))).double()
    problem = BilevelProblem(model, reward, CategoricalExact(1.0), train, val)
    phi = problem.phi()
    theta, grad_norm = solve_inner(problem, problem.theta(), phi)
    assert grad_norm < 1e-10
    config = LinearSolverConfig(method="cg", damping=0.0, tol=1e-12, max_iter=100)
    hypergradient, _, _ = implicit_hypergradient(problem, theta, phi, config)
    fd, h = torch.zeros_like(phi), 1e-5
    for i in range(len(phi)):
        step = torch.zeros_like(phi)
        step[i] = h
        values = [
            float(problem.outer_loss(solve_inner(problem, theta, p)[0]))
            for p in (phi + step, phi - step)
        ]
        fd[i] = (values[0] - values[1]) / (2 * h)
    assert float((hypergradient - fd).norm() / fd.norm()) < 1e-4, (hypergradient, fd)


def test_input_dependent_hypergradient_matches_directional_finite_differences(sigma3):
    train, val = gaussian_data(sigma3, n=60, scale_fn=lambda x: x[:, 0].exp())
    torch.manual_seed(0)
    model = LinearGaussian(3, 3).double()
    reward = InputDependentMahalanobis(3, optimal_reward_matrix(sigma3, LAM), hidden=(8,)).double()
    with torch.no_grad():
        reward.net[-1].weight.normal_(0, 0.1)
    problem = BilevelProblem(model, reward, GaussianClosedForm(LAM), train, val)
    phi = problem.phi()
    theta, grad_norm = solve_inner(problem, problem.theta(), phi)
    assert grad_norm < 1e-10
    config = LinearSolverConfig(method="cg", damping=0.0, tol=1e-12, max_iter=200)
    hypergradient, _, _ = implicit_hypergradient(problem, theta, phi, config)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        d = torch.randn(len(phi), generator=g, dtype=torch.float64)
        d = d / d.norm()
        values = [
            float(problem.outer_loss(solve_inner(problem, theta, phi + s * 1e-5 * d)[0]))
            for s in (1, -1)
        ]
        fd = (values[0] - values[1]) / 2e-5
        assert abs(float(hypergradient @ d) - fd) < 1e-4 * max(
            abs(fd), float(hypergradient.norm())
        ), fd


# ---------------------------------------------------------------- rewards


def test_input_dependent_reward_starts_at_its_initial_matrix_and_stays_spd(reward_matrix3):
    torch.manual_seed(0)
    reward = InputDependentMahalanobis(2, reward_matrix3).double()
    x = torch.randn(7, 2, dtype=torch.float64)
    U = reward.matrix_at(x)
    assert U.shape == (7, 3, 3)
    assert torch.allclose(U, reward_matrix3.expand(7, 3, 3), rtol=1e-3)
    with torch.no_grad():
        reward.net[-1].weight.normal_(0, 3.0)
    assert (torch.linalg.eigvalsh(reward.matrix_at(x)) > 0).all()
    r = reward(torch.randn(4, 7, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64), x)
    assert r.shape == (4, 7) and (r <= 0).all()


def test_non_spd_initial_reward_is_refused():
    bad = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)
    for kind in ("scalar", "diag", "full", "input"):
        with pytest.raises(ConfigError, match="positive definite"):
            make_mahalanobis(kind, bad, in_dim=2)


@pytest.mark.parametrize("lam", [0.0, -1.0, float("nan")])
def test_non_positive_lambda_is_refused(lam):
    for make in (GaussianClosedForm, CategoricalExact, Pathwise):
        with pytest.raises(ConfigError, match="λ"):
            make(lam)
    with pytest.raises(ConfigError, match="λ"):
        PluginLearner("full", lam, steps=10)


# ---------------------------------------------------------------- plug-in


def test_plugin_matrices_and_shrinkage():
    sigma = spd(3)
    assert torch.allclose(plugin_matrix("full", sigma, LAM), optimal_reward_matrix(sigma, LAM))
    assert torch.allclose(plugin_matrix("diag", sigma, LAM).diagonal(), LAM / 2 / sigma.diagonal())
    scalar = plugin_matrix("scalar", sigma, LAM)
    assert torch.allclose(scalar, LAM * 3 / (2 * sigma.trace()) * torch.eye(3).double())
    assert shrink(sigma, 1e12) is sigma
    bad = torch.diag(torch.tensor([1.0, 1.0, 1e-9], dtype=torch.float64))
    fixed = torch.linalg.eigvalsh(shrink(bad, 100.0))
    assert float(fixed[-1] / fixed[0]) == pytest.approx(100.0, rel=1e-6)


def test_plugin_estimates_the_residual_covariance(sigma3):
    train, val = gaussian_data(sigma3, n=4000)
    torch.manual_seed(0)
    model = LinearGaussian(3, 3).double()
    with torch.no_grad():  # the true mean f(x) = x + 6: residuals are the noise
        model.linear.weight.copy_(torch.eye(3))
        model.linear.bias.fill_(6.0)
    learner = PluginLearner("full", LAM, steps=1, lr=1e-9)
    learner.fit(model, train, val)
    error = torch.linalg.norm(learner.reward.matrix() - optimal_reward_matrix(sigma3, LAM))
    assert float(error / torch.linalg.norm(optimal_reward_matrix(sigma3, LAM))) < 0.08
    raw = PluginLearner("raw-full", LAM, steps=1, lr=1e-9)
    raw.fit(model, train, val)  # the reference's Σ̂ of raw targets: far from U* (x varies)
    error = torch.linalg.norm(raw.reward.matrix() - optimal_reward_matrix(sigma3, LAM))
    assert float(error / torch.linalg.norm(optimal_reward_matrix(sigma3, LAM))) > 0.3


# ---------------------------------------------------------------- learners


def empty_like(data):
    return Dataset(data.x[:0], data.y[:0])


def test_empty_held_out_split_is_refused(sigma3):
    train, val = gaussian_data(sigma3, n=20)
    model = LinearGaussian(3, 3).double()
    reward = make_mahalanobis("full", torch.eye(3, dtype=torch.float64))
    learner = BilevelLearner(reward, GaussianClosedForm(LAM), outer_steps=1, inner_steps=1)
    for bad in (None, empty_like(val)):
        with pytest.raises(ConfigError, match="held-out"):
            learner.fit(model, train, bad)
        with pytest.raises(ConfigError, match="held-out"):
            PluginLearner("full", LAM, steps=1).fit(model, train, bad)


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_learner_logs_scalars_and_keeps_outer_optimizer_state(sigma3, method):
    train, val = gaussian_data(sigma3, n=100)
    torch.manual_seed(0)
    model = LinearGaussian(3, 3).double()
    reward = make_mahalanobis("diag", torch.eye(3, dtype=torch.float64))
    writer = Recorder()
    learner = BilevelLearner(
        reward,
        GaussianClosedForm(LAM),
        method=method,
        outer_steps=3,
        inner_steps=5,
        inner_lr=0.05,
        outer_lr=0.05,
        u_star=lambda x: optimal_reward_matrix(sigma3, LAM),
        writer=writer,
    )
    before = reward.matrix().clone()
    metrics = learner.fit(model, train, val)
    learner.fit(model, train, val)
    expected = {
        "outer/train_nll",
        "outer/val_nll",
        "outer/hypergrad_norm",
        "reward/u_eig_min",
        "reward/u_eig_max",
        "reward/u_star_error",
    }
    if method == "implicit":
        expected |= {"solver/residual", "solver/iterations"}
    assert expected <= writer.names, expected - writer.names
    assert set(metrics) >= {"outer/val_nll", "reward/u_star_error"}
    assert not torch.allclose(reward.matrix(), before)
    state = learner.outer_optimizer.state[reward.log_diag]
    assert int(state["step"]) == 6  # one Adam across outer steps and across calls of fit
    assert [row["step"] for row in learner.history] == [5.0 * k for k in range(1, 7)]


def test_a_diverging_inner_loop_raises_not_nan(sigma3):
    train, val = gaussian_data(sigma3, n=50)
    model = LinearGaussian(3, 3).double()
    reward = make_mahalanobis("full", torch.eye(3, dtype=torch.float64))
    with torch.no_grad():
        model.linear.weight.fill_(float("nan"))
    learner = BilevelLearner(reward, GaussianClosedForm(LAM), outer_steps=1, inner_steps=1)
    with pytest.raises(FloatingPointError, match="inner loss"):
        learner.fit(model, train, val)


def test_outer_step_with_a_failed_linear_solve_is_skipped(sigma3, caplog):
    """An objective whose -J is concave in θ: CG meets negative curvature at once (residual 1),
    so the outer step is skipped (logged at INFO, not WARNING) and U does not move."""

    class Concave:
        lam = LAM

        def __call__(self, predictor, reward, x, y):
            return predictor(x).mean.pow(2).mean() * reward.matrix().trace()

    train, val = gaussian_data(sigma3, n=50)
    torch.manual_seed(0)
    model = LinearGaussian(3, 3).double()
    reward = make_mahalanobis("full", torch.eye(3, dtype=torch.float64))
    learner = BilevelLearner(reward, Concave(), outer_steps=2, inner_steps=1, inner_lr=1e-6)
    before = reward.matrix().detach().clone()
    with caplog.at_level(logging.INFO):
        learner.fit(model, train, val)
    skips = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert skips and all(r.levelno == logging.INFO for r in skips)
    assert "non-positive curvature" in caplog.text
    assert torch.equal(reward.matrix().detach(), before)
