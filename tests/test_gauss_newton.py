"""The Gauss–Newton curvature of the IFT (hypergrad.BilevelProblem.gauss_newton) and its block
solve on an ensemble's output layer (solvers/output_layer.py), against closed forms in float64:
on a diagonal Gaussian whose mean and log-variance are linear in θ the Gauss–Newton matrix is the
exact Hessian, so its hypergradient equals central finite differences of the outer objective
with the inner problem solved exactly."""

import pytest
import torch
from torch import nn
from torch.distributions import Independent, Normal
from torch.func import grad, hessian

from mbrl_bilevel.data import Dataset
from mbrl_bilevel.ensemble import GaussianEnsemble, NormalisedTargets
from mbrl_bilevel.rewards import DiagonalInputMahalanobis, DiagonalMahalanobis, ScalarMahalanobis
from mbrl_bilevel.solvers.hypergrad import BilevelProblem, implicit_hypergradient, solve_inner
from mbrl_bilevel.solvers.linear import LinearSolverConfig
from mbrl_bilevel.solvers.objectives import GaussianClosedForm
from mbrl_bilevel.solvers.output_layer import DenseSystem, OutputLayerSystem, curvature_system
from mbrl_bilevel.validation import ConfigError

LAM = 0.7


class LinearHeteroscedastic(nn.Module):
    """N(W x + b, diag exp(V x + c)): mean and log-variance both linear in θ."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.mean, self.log_var = nn.Linear(in_dim, out_dim), nn.Linear(in_dim, out_dim)

    def forward(self, x):
        return Independent(Normal(self.mean(x), (0.5 * self.log_var(x)).exp()), 1)


def data(n, seed):
    """y = x A + (0.3 + 0.4|x_0|) ε: heteroscedastic, x [n, 3], y [n, 2], float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    a = torch.tensor([[1.0, -0.5], [0.3, 0.8], [0.0, 0.4]], dtype=torch.float64)
    noise = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return Dataset(x, x @ a + (0.3 + 0.4 * x[:, :1].abs()) * noise)


def make_reward(kind):
    start = torch.tensor([1.3, 0.6])
    if kind == "diag":
        return DiagonalMahalanobis(start).double()
    if kind == "scalar":
        return ScalarMahalanobis(2, 0.9).double()
    reward = DiagonalInputMahalanobis(3, torch.diag(start)).double()
    with torch.no_grad():  # a non-constant U(x), so every coordinate of φ matters
        generator = torch.Generator().manual_seed(3)
        for p in reward.net.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return reward


def linear_problem(kind):
    torch.manual_seed(0)
    predictor = LinearHeteroscedastic(3, 2).double()
    return BilevelProblem(
        predictor, make_reward(kind), GaussianClosedForm(LAM), data(80, 1), data(80, 2)
    )


KINDS = ["scalar", "diag", "input"]


@pytest.mark.parametrize("kind", KINDS)
def test_gauss_newton_is_the_exact_hessian_where_the_outputs_are_linear_in_theta(kind):
    problem = linear_problem(kind)
    theta, phi = problem.theta(), problem.phi()
    gauss_newton, mixed = problem.gauss_newton(theta, phi)
    hessian_product, exact_mixed = problem.second_order(theta, phi)
    for seed in range(3):
        v = torch.randn(len(theta), generator=torch.Generator().manual_seed(seed)).double()
        torch.testing.assert_close(gauss_newton(v), hessian_product(v), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(mixed(v), exact_mixed(v), rtol=1e-10, atol=1e-12)


def test_gauss_newton_is_psd_where_the_hessian_is_not():
    """Through a nonlinear trunk the exact Hessian of -J has negative eigenvalues; J_θᵀ H_out J_θ
    never does."""
    torch.manual_seed(0)
    ensemble = GaussianEnsemble(3, 2, members=2, elites=1, hidden=(6,)).double()
    view = NormalisedTargets(ensemble)
    train = data(60, 1)
    problem = BilevelProblem(view, make_reward("diag"), GaussianClosedForm(LAM), train, train)
    theta, phi = problem.theta(), problem.phi()
    exact = torch.linalg.eigvalsh(problem.hessian(theta, phi))
    gauss_newton, _ = problem.gauss_newton(theta, phi)
    matrix = torch.func.vmap(gauss_newton)(torch.eye(len(theta), dtype=theta.dtype))
    torch.testing.assert_close(matrix, matrix.T)
    assert exact.min() < -1e-3 * exact.max()
    assert torch.linalg.eigvalsh(matrix).min() > -1e-10 * exact.max()


def directions(phi):
    """The coordinate axes of a small φ, else 3 random unit directions [k, Q]."""
    if len(phi) <= 2:
        return torch.eye(len(phi), dtype=phi.dtype)
    u = torch.randn(3, len(phi), generator=torch.Generator().manual_seed(0), dtype=phi.dtype)
    return u / u.norm(dim=1, keepdim=True)


@pytest.fixture(scope="module", params=KINDS)
def solved(request):
    """(problem, θ*(φ), φ, directions u [k, Q], central differences of F(θ*(φ)) along them)."""
    problem = linear_problem(request.param)
    phi = problem.phi()

    def outer(p):
        theta, norm = solve_inner(problem, problem.theta(), p, tol=1e-11)
        assert norm < 1e-9
        return float(problem.outer_loss(theta)), theta

    u = directions(phi)
    fd = torch.tensor([(outer(phi + 1e-5 * d)[0] - outer(phi - 1e-5 * d)[0]) / 2e-5 for d in u])
    return problem, outer(phi)[1], phi, u, fd.to(phi)


@pytest.mark.parametrize("method", ["dense", "cg"])
def test_gauss_newton_hypergradient_matches_finite_differences(solved, method):
    problem, theta, phi, u, fd = solved
    config = LinearSolverConfig(
        method=method, damping=0.0, tol=1e-12, max_iter=200, curvature="gauss-newton"
    )
    hypergradient, _, info = implicit_hypergradient(problem, theta, phi, config)
    assert info.residual < 1e-8
    error = float((u @ hypergradient - fd).norm() / fd.norm())
    assert error < 1e-5, (u @ hypergradient, fd)


@pytest.mark.parametrize("kind", ["diag", "input"])
def test_output_curvature_is_the_diagonal_of_the_output_hessian(kind):
    """2U_d for a mean, U_d e^{s_d} for a log-variance, and no cross terms."""
    problem = linear_problem(kind)
    outputs = problem.outputs(problem.theta())[:4]  # 4 inputs, [4, 2D]
    small = BilevelProblem(
        problem.predictor,
        problem.reward,
        problem.objective,
        problem.train.subset(torch.arange(4)),
        problem.val,
    )
    full = hessian(small.output_loss)(outputs, problem.phi()).reshape(16, 16)
    closed = GaussianClosedForm.output_curvature(
        problem.reward, outputs[:, 2:], small.train.x
    ) / len(outputs)  # ℓ averages over the inputs
    torch.testing.assert_close(full, torch.diag(closed.reshape(-1)), rtol=1e-10, atol=1e-12)
    with pytest.raises(ConfigError, match="diagonal reward"):
        GaussianClosedForm.output_curvature(nn.Module(), outputs[:, 2:], small.train.x)


def ensemble_problem(reward, rows=50, dtype=torch.float64):
    """A 3-member ensemble (3 × 8 trunk) after a few random perturbations, θ its output layer."""
    torch.manual_seed(1)
    ensemble = GaussianEnsemble(3, 2, members=3, elites=2, hidden=(8, 8)).to(dtype)
    with torch.no_grad():
        ensemble.biases[-1].add_(0.3 * torch.randn_like(ensemble.biases[-1]))
    view = NormalisedTargets(ensemble)
    train, val = data(rows, 1), data(rows, 2)
    train, val = (Dataset(d.x.to(dtype), d.y.to(dtype)) for d in (train, val))
    return BilevelProblem(
        view, reward.to(dtype), GaussianClosedForm(LAM), train, val, view.output_layer_names()
    )


@pytest.mark.parametrize("kind", ["diag", "input"])
def test_block_system_is_the_damped_gauss_newton_matrix_and_solves_it(kind):
    problem = ensemble_problem(make_reward(kind))
    theta, phi = problem.theta(), problem.phi()
    system = OutputLayerSystem(problem, theta, damping=1e-3)
    gauss_newton, mixed = problem.gauss_newton(theta, phi)
    damping = system.flat(system.damping[:, None, :].expand(system.shape))
    dense = torch.func.vmap(gauss_newton)(torch.eye(len(theta), dtype=theta.dtype))
    dense = dense + torch.diag(damping)
    v = torch.randn(len(theta), generator=torch.Generator().manual_seed(0)).double()
    block = system.flat(system.product(system.blocks(v)[..., None])[..., 0])
    torch.testing.assert_close(block, dense @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(system.inner_grad(phi), problem.inner_grad(theta, phi))
    rhs = grad(problem.outer_loss)(theta)
    (solution,), info = system.solve([rhs], tol=1e-10, max_iter=200)
    assert info.converged and info.residual <= 1e-10
    torch.testing.assert_close(solution, torch.linalg.solve(dense, rhs), rtol=1e-7, atol=1e-10)
    tangent = system.jacobian(system.blocks(solution))
    torch.testing.assert_close(
        problem.output_mixed(system.outputs, phi)(tangent), mixed(solution), rtol=1e-10, atol=1e-12
    )


def test_mean_blocks_under_a_constant_reward_are_solved_in_one_iteration():
    """The preconditioner a G_e + δI is the block itself where the row weights are constant."""
    problem = ensemble_problem(make_reward("diag"))
    system = OutputLayerSystem(problem, problem.theta(), damping=1e-3)
    rhs = torch.randn(system.shape, generator=torch.Generator().manual_seed(0)).double()
    rhs[..., 2:] = 0  # mean heads only
    _, info = system.solve([system.flat(rhs)], tol=1e-10, max_iter=1)
    assert info.iterations == 1 and info.residual < 1e-10


def test_outer_gap_of_the_mean_heads_is_their_share_of_a_constant_rewards_hypergradient():
    """For U = diag(exp φ), -J's mean part in dimension d is U_d Σ (μ_d - y_d)²: its mixed term in
    φ_d is the mean heads' own gradient, so their contribution to dF/dφ_d is -∇Fᵀ A⁻¹ ∇L over
    the mean blocks of d, which vanishes where the inner problem is solved (θ = θ*)."""
    problem = ensemble_problem(make_reward("diag"))
    theta, phi = problem.theta(), problem.phi()
    system = OutputLayerSystem(problem, theta, damping=1e-3)
    inner, outer = problem.inner_grad(theta, phi), grad(problem.outer_loss)(theta)
    (v, newton), _ = system.solve([outer, inner], tol=1e-12, max_iter=200)
    mean_only = system.blocks(v).clone()
    mean_only[..., 2:] = 0
    contribution = -problem.output_mixed(system.outputs, phi)(system.jacobian(mean_only))
    gap = (system.blocks(outer) * system.blocks(newton))[..., :2].sum((0, 1))
    torch.testing.assert_close(contribution, -gap, rtol=1e-8, atol=1e-12)
    assert gap.abs().min() > 1e-4  # the fixture is not at its optimum: the check is not 0 = 0


def test_dense_system_is_the_damped_gauss_newton_matrix_of_any_predictor():
    """For a predictor without the ensemble's stacked output layer (here a linear one), the
    Gauss–Newton matrix is materialised: its solve and mixed product are the exact ones."""
    problem = linear_problem("input")
    theta, phi = problem.theta(), problem.phi()
    system = curvature_system(problem, theta, damping=1e-3)
    assert isinstance(system, DenseSystem) and system.dims == 2
    hessian_matrix = problem.hessian(theta, phi)  # = Gauss–Newton here (outputs linear in θ)
    damped = hessian_matrix + 1e-3 * hessian_matrix.trace() / len(theta) * torch.eye(len(theta))
    rhs = grad(problem.outer_loss)(theta)
    (solution,), info = system.solve([rhs])
    assert info.residual < 1e-10
    torch.testing.assert_close(solution, torch.linalg.solve(damped, rhs))
    _, exact_mixed = problem.second_order(theta, phi)
    torch.testing.assert_close(system.mixed(solution), exact_mixed(solution))
