"""mbrl-bilevel's core: probabilistic models trained by maximum likelihood or by policy gradient
under a reward that a bilevel outer loop learns from the data. What a user imports:

    from mbrl_bilevel import GaussianEnsemble, FitConfig, PGOptions, make_dynamics_learner
    learner = make_dynamics_learner("pg-plugin-input-beta", FitConfig(), in_dim, out_dim)
    metrics = learner.fit(GaussianEnsemble(in_dim, out_dim), train, val)

The agents are in `agents` (PETS, MBPO), the environments and datasets in `envs`.
"""

from mbrl_bilevel.data import Dataset
from mbrl_bilevel.ensemble import EnsembleLearner, GaussianEnsemble
from mbrl_bilevel.learners import DYNAMICS_LOSSES, PGOptions, make_dynamics_learner
from mbrl_bilevel.losses import BetaNLLLoss, BetaPGLoss, MSELoss, NLLLoss, PathwisePGLoss, PGLoss
from mbrl_bilevel.rewards import (
    CholeskyMahalanobis,
    DiagonalInputMahalanobis,
    DiagonalMahalanobis,
    FixedMahalanobis,
    InputDependentMahalanobis,
    OneHotReward,
    ScalarMahalanobis,
)
from mbrl_bilevel.training import FitConfig, fit
from mbrl_bilevel.transitions import Transitions

__all__ = [
    "DYNAMICS_LOSSES",
    "BetaNLLLoss",
    "BetaPGLoss",
    "CholeskyMahalanobis",
    "Dataset",
    "DiagonalInputMahalanobis",
    "DiagonalMahalanobis",
    "EnsembleLearner",
    "FitConfig",
    "FixedMahalanobis",
    "GaussianEnsemble",
    "InputDependentMahalanobis",
    "MSELoss",
    "NLLLoss",
    "OneHotReward",
    "PGLoss",
    "PGOptions",
    "PathwisePGLoss",
    "ScalarMahalanobis",
    "Transitions",
    "fit",
    "make_dynamics_learner",
]
