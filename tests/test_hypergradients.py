"""Hypergradients against central finite differences of F, in float64, on a 3-D Gaussian problem
with non-diagonal Σ whose inner problem is solved to ‖∇_θ L‖ < 1e-10 (issue 3 acceptance)."""

import pytest
import torch

from mbrl_bilevel.gaussian import SyntheticGaussian
from mbrl_bilevel.models import LinearGaussian
from mbrl_bilevel.rewards import make_mahalanobis
from mbrl_bilevel.solvers.hypergrad import (
    BilevelProblem,
    implicit_hypergradient,
    solve_inner,
    unrolled_hypergradient,
)
from mbrl_bilevel.solvers.linear import LinearSolverConfig
from mbrl_bilevel.solvers.objectives import GaussianClosedForm

LAM = 0.7


def make_problem(kind, sigma3, reward_matrix3):
    data = SyntheticGaussian(sigma3)
    generator = torch.Generator().manual_seed(0)
    train, val = data.sample(60, 3, generator), data.sample(60, 3, generator)
    torch.manual_seed(0)
    predictor = LinearGaussian(3, 3, covariance="full").double()
    reward = make_mahalanobis(kind, reward_matrix3).double()
    if kind == "diag":  # a non-isotropic start so every coordinate of φ matters
        with torch.no_grad():
            reward.log_diag.add_(torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64))
    return BilevelProblem(predictor, reward, GaussianClosedForm(LAM), train, val)


def outer_value(problem, theta, phi):
    theta, grad_norm = solve_inner(problem, theta, phi)
    assert grad_norm < 1e-10
    return float(problem.outer_loss(theta)), theta


def finite_difference(problem, theta, phi, h=1e-5):
    fd = torch.zeros_like(phi)
    for i in range(len(phi)):
        step = torch.zeros_like(phi)
        step[i] = h
        plus, _ = outer_value(problem, theta, phi + step)
        minus, _ = outer_value(problem, theta, phi - step)
        fd[i] = (plus - minus) / (2 * h)
    return fd


def rel_error(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module", params=["scalar", "diag", "full"])
def solved(request):
    from tests.conftest import SIGMA_3D

    A = torch.tensor([[1.0, 0.4, -0.2], [0.0, 0.8, 0.5], [0.0, 0.0, 1.2]], dtype=torch.float64)
    problem = make_problem(request.param, SIGMA_3D, A @ A.T + 0.1 * torch.eye(3).double())
    phi = problem.phi()
    _, theta = outer_value(problem, problem.theta(), phi)
    return problem, theta, phi, finite_difference(problem, theta, phi)


@pytest.mark.parametrize("method", ["dense", "cg", "minres"])
def test_implicit_hypergradient_matches_finite_differences(solved, method):
    problem, theta, phi, fd = solved
    config = LinearSolverConfig(method=method, damping=0.0, tol=1e-12, max_iter=200)
    hypergradient, _, info = implicit_hypergradient(problem, theta, phi, config)
    assert info.residual < 1e-8
    error = rel_error(hypergradient, fd)
    print(f"\n{len(phi)}-parameter reward, IFT ({method}) vs finite differences: {error:.2e}")
    assert error < 1e-4, (hypergradient, fd)


def test_neumann_hypergradient_approaches_the_exact_one(solved):
    problem, theta, phi, fd = solved
    top = float(torch.linalg.eigvalsh(problem.hessian(theta, phi)).max())
    errors = []
    for terms in (5, 80):
        config = LinearSolverConfig(
            method="neumann", damping=0, max_iter=terms, neumann_step=1 / top
        )
        hypergradient, _, _ = implicit_hypergradient(problem, theta, phi, config)
        errors.append(rel_error(hypergradient, fd))
    assert errors[1] < errors[0] and errors[1] < 1e-4, errors


def test_unrolled_hypergradient_agrees_as_k_grows(solved):
    problem, theta, phi, fd = solved
    dense = LinearSolverConfig(method="dense", damping=0.0)
    implicit, _, _ = implicit_hypergradient(problem, theta, phi, dense)
    lr = 1.0 / float(torch.linalg.eigvalsh(problem.hessian(theta, phi)).max())
    errors = []
    for steps in (3, 30, 150):
        unrolled, theta_k = unrolled_hypergradient(problem, theta, phi, steps, lr)
        errors.append(rel_error(unrolled, implicit))
    print(f"\n{len(phi)}-parameter reward, unrolled K = 3, 30, 150 vs IFT: {errors}")
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 1e-2 and rel_error(unrolled, fd) < 1e-2, errors
    assert float((theta_k - theta).norm()) < 1e-8  # started at θ*: the steps stay there
