"""The outer loop of the bilevel problem: learners that fit a predictor by PG under a reward they
adapt. All share the Learner interface fit(predictor, train, val) -> metrics dict.

- PluginLearner: U from the residual covariance (full, diag, scalar), or the reference's fixed U.
- BilevelLearner(method="implicit" | "unrolled"): U learned by hypergradients of the held-out
  NLL, computed from a differentiable Objective (GaussianClosedForm, CategoricalExact, Pathwise).
- BilevelProblem, implicit_hypergradient, unrolled_hypergradient, solve_inner: the functional
  core (flat θ, φ), for other studies and for tests.
"""

from mbrl_bilevel.solvers.bilevel import BilevelLearner, ObjectiveLoss
from mbrl_bilevel.solvers.hypergrad import (
    BilevelProblem,
    implicit_hypergradient,
    solve_inner,
    unrolled_hypergradient,
)
from mbrl_bilevel.solvers.linear import LinearSolverConfig, SolveInfo
from mbrl_bilevel.solvers.objectives import (
    CategoricalExact,
    GaussianClosedForm,
    Objective,
    Pathwise,
)
from mbrl_bilevel.solvers.plugin import PluginLearner

__all__ = [
    "BilevelLearner",
    "BilevelProblem",
    "CategoricalExact",
    "GaussianClosedForm",
    "LinearSolverConfig",
    "Objective",
    "ObjectiveLoss",
    "Pathwise",
    "PluginLearner",
    "SolveInfo",
    "implicit_hypergradient",
    "solve_inner",
    "unrolled_hypergradient",
]
