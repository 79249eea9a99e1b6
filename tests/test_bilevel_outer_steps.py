"""The bilevel outer steps inside an ensemble fit (solvers.updates.ImplicitRefresh with
output_layer.output_layer_outer_step): skipped where the inner problem is not stationary,
counted rather than printed; the held-out NLL of a seeded HalfCheetah fit never rises; and on
data whose noise σ(x) is known, bilevel-input's model learns σ(x)."""

import logging

import pytest
import torch

from envs.collect import collect
from envs.make import make_env
from mbrl_bilevel.data import random_split
from mbrl_bilevel.ensemble import GaussianEnsemble, NormalisedTargets
from mbrl_bilevel.learners import PGOptions, make_dynamics_learner
from mbrl_bilevel.solvers.hypergrad import BilevelProblem
from mbrl_bilevel.solvers.output_layer import newton_point
from mbrl_bilevel.training import FitConfig
from tests.test_reward_updates import hetero_data, hetero_std, linear_data


class Scalars:
    """A SummaryWriter stand-in: rows[key][step] = value."""

    def __init__(self):
        self.rows: dict[str, dict[int, float]] = {}

    def add_scalar(self, key, value, step):
        self.rows.setdefault(key, {})[step] = value


def linear_learner(strategy="bilevel", steps=400, **update):
    torch.manual_seed(0)
    ensemble = GaussianEnsemble(3, 2, members=3, elites=2, hidden=(32, 32))
    config = FitConfig(steps=steps, lr=5e-3, batch_size=256, eval_every=100)
    writer = Scalars()
    learner = make_dynamics_learner(
        strategy, config, 3, 2, writer=writer, options=PGOptions(refresh_every=20, hyper_batch=512)
    )
    for name, value in update.items():
        setattr(learner.update, name, value)
    return ensemble, learner, writer


def test_outer_steps_where_the_inner_problem_is_not_stationary_are_skipped_and_counted(caplog):
    """With a stationarity bound no fit can meet, every outer step is skipped: U is the plug-in
    the steps anchor it to, each skip is logged at DEBUG (nothing at WARNING), and the fit's
    metrics carry the counts and shares by reason."""
    ensemble, learner, writer = linear_learner(stationarity=1e-12)
    with caplog.at_level(logging.DEBUG, logger="mbrl_bilevel.solvers.updates"):
        metrics = learner.fit(ensemble, linear_data(3000, 1), linear_data(1000, 2))
    assert metrics["solver/outer_steps"] == metrics["solver/skipped_not_stationary"] == 20
    assert metrics["solver/share_skipped_not_stationary"] == 1.0
    assert metrics["solver/skipped_solve_failed"] == 0
    assert metrics["reward/log_u_over_plugin_max"] < 1e-5
    debug = [r for r in caplog.records if "skipped: not stationary" in r.getMessage()]
    assert len(debug) == 20 and all(r.levelno == logging.DEBUG for r in debug)
    assert "outer/objective_after" not in writer.rows  # no step, no prediction


def predicted_changes(writer):
    """outer/objective_after - outer/objective_before of every taken outer step."""
    before, after = writer.rows["outer/objective_before"], writer.rows["outer/objective_after"]
    return [after[step] - before[step] for step in sorted(after)]


def test_taken_outer_steps_descend_and_the_stationarity_test_is_why():
    """Every step the stationarity test lets through lowers the predicted held-out NLL (at the
    inner problem's linear response to the new φ), with solves that meet their tolerance. With
    the test off, the steps taken far from stationarity (outer gaps of 1-50 nat/dim early in the
    fit) follow a hypergradient that raises it: 8 of 20 here."""
    train, val = linear_data(3000, 1), linear_data(1000, 2)
    ensemble, learner, writer = linear_learner(steps=800)
    metrics = learner.fit(ensemble, train, val)
    changes = predicted_changes(writer)
    assert 0 < len(changes) == 40 - metrics["solver/skipped_not_stationary"]
    assert max(changes) <= 0
    assert max(writer.rows["solver/residual"].values()) <= 1e-4
    ensemble, learner, writer = linear_learner(stationarity=1e6)
    learner.fit(ensemble, train, val)
    assert sum(change > 0 for change in predicted_changes(writer)) >= 4


def test_newton_point_solves_the_output_layer_problem():
    """Two Gauss–Newton steps bring the hyper-batch's inner problem near stationarity: the outer
    gap at the fit's own output layer shrinks at least 20-fold, and -J decreases."""
    ensemble, learner, _ = linear_learner(steps=200)
    train, val = linear_data(3000, 1), linear_data(1000, 2)
    learner.fit(ensemble, train, val)
    view = NormalisedTargets(ensemble)
    update = learner.update
    problem = BilevelProblem(
        view,
        update.reward,
        update.objective,
        view.normalise(train).subset(torch.arange(512)),
        view.normalise(val).subset(torch.arange(512)),
        view.output_layer_names(),
    )
    phi = problem.phi()

    def gap(theta, system):
        inner = problem.inner_grad(theta, phi).detach()
        outer = torch.func.grad(problem.outer_loss)(theta)
        (newton,), _ = system.solve([inner], 1e-8, 200)
        return float(outer @ newton) / 2

    own = problem.theta()
    solved, system = newton_point(problem, own, update.linear, steps=2)
    start = gap(own, newton_point(problem, own, update.linear, steps=0)[1])
    print(f"outer gap {start:.3g} at the fit's own output layer, {gap(solved, system):.3g} after")
    assert abs(gap(solved, system)) < 0.05 * abs(start)
    assert float(problem.inner_loss(solved, phi)) < float(problem.inner_loss(own, phi))


def cheetah_splits():
    """4000 random-policy HalfCheetah-v5 transitions, Δ-state targets, split 80/20."""
    data = collect(make_env("HalfCheetah-v5"), 4000, seed=0, progress=False)
    return random_split(
        data.model_dataset(delta=True), [0.8, 0.2], torch.Generator().manual_seed(0)
    )


def test_outer_objective_never_rises_across_a_seeded_halfcheetah_fit():
    """The held-out NLL per dimension at every validation of a bilevel fit stays within 0.05 of
    its best so far, and no outer step fails its solve. (Here the inner problem lags: PG's
    output layer sits 0.1-0.3 nat/dim of held-out NLL from its optimum, so the stationarity test
    skips the outer steps and U follows the plug-in; docs/results/bilevel.md.)"""
    train, val = cheetah_splits()
    torch.manual_seed(0)
    dims = train.y.shape[1]
    ensemble = GaussianEnsemble(train.x.shape[1], dims, members=3, elites=2, hidden=(64, 64))
    config = FitConfig(steps=1000, lr=1e-3, batch_size=256, eval_every=50, patience=100)
    writer = Scalars()
    learner = make_dynamics_learner(
        "bilevel", config, train.x.shape[1], dims, writer=writer, progress=False
    )
    metrics = learner.fit(ensemble, train, val)
    nll = [writer.rows["val/nll"][step] / dims for step in sorted(writer.rows["val/nll"])]
    rises = [value - min(nll[: i + 1]) for i, value in enumerate(nll)]
    assert max(rises) <= 0.05, nll
    assert nll[-1] < nll[0] - 0.5
    assert metrics["solver/outer_steps"] == 20 and metrics["solver/skipped_solve_failed"] == 0


@pytest.mark.parametrize("strategy", ["bilevel-input"])
def test_bilevel_input_learns_the_known_noise_of_heteroscedastic_data(strategy):
    """σ(x) = (0.05 + 0.5|x|, 0.05 + 0.25(1 + x)), 11× apart over x: the elite mixture's std on
    held-out inputs is within 10% of σ(x) (median relative error; 7.7% here, pg-plugin-input's
    6.0%)."""
    torch.manual_seed(0)
    train, val, test = hetero_data(3000, 1), hetero_data(1000, 2), hetero_data(2000, 3)
    ensemble = GaussianEnsemble(1, 2, members=3, elites=2, hidden=(32, 32))
    config = FitConfig(steps=800, lr=5e-3, batch_size=256, eval_every=100, patience=100)
    learner = make_dynamics_learner(
        strategy, config, 1, 2, options=PGOptions(refresh_every=20), progress=False
    )
    metrics = learner.fit(ensemble, train, val)
    std = ensemble.mixture(test.x).variance.sqrt()
    error = (std / hetero_std(test.x) - 1).abs().median()
    assert error < 0.10, error
    assert metrics["solver/skipped_solve_failed"] == 0
    assert metrics["solver/share_skipped_not_stationary"] < 0.5  # the outer loop does step
