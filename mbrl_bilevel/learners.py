"""Ensemble dynamics learners by name: `make_dynamics_learner("bilevel", ...)` returns an object
with fit(ensemble, train, val) -> metrics. Agents and the dynamics benchmark never branch on
which learner they hold.

Every learner is an EnsembleLearner (normalised targets, bootstrap, log-variance penalty, holdout
early stopping, elites); the PG strategies add a reward and the update that sets it, in
normalised target units:

- pg-identity (alias pg): U = I, fixed (the reference's default);
- pg-scaled: U = λd/(2 tr Σ̂)·I, Σ̂ the residual covariance of a least-squares fit on train;
- pg-raw-sigma: U = (λ/2)Σ̂⁻¹, Σ̂ the covariance of the targets themselves (the reference's pitfall);
- pg-plugin: U = (λ/2)diag(Σ̂)⁻¹, Σ̂ the held-out residual covariance of the model, refreshed;
- pg-plugin-input: U(x) = (λ/2)diag(σ̂²(x))⁻¹, σ̂²(x) a small MLP regression of the model's
  held-out squared residuals on x, refreshed (PG then learns a heteroscedastic variance);
- pg-plugin-input-beta: the same reward, each input's and dimension's term of J weighted by
  σ̂²(x)^β (losses.BetaPGLoss: the mean no longer weighted by U(x), as β-NLL does for NLL),
  then the mean phase (mean_head.py: the mean heads refitted by least squares on the frozen
  trunk) and the variance phase (variance_head.VarianceHeadFit: the log-variance head alone
  fitted to the unweighted variance part of J, trunk and means frozen);
- bilevel: a diagonal U learned by implicit differentiation of the held-out NLL;
- bilevel-input: an input-dependent diagonal U(x) learned the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from mbrl_bilevel.data import Dataset
from mbrl_bilevel.ensemble import LOG_VAR_PENALTY, EnsembleLearner
from mbrl_bilevel.gaussian import optimal_reward_matrix, residual_covariance, scaled_reward_scalar
from mbrl_bilevel.losses import (
    BASELINES,
    BetaNLLLoss,
    BetaPGLoss,
    MSELoss,
    NLLLoss,
    PathwisePGLoss,
    PGLoss,
)
from mbrl_bilevel.rewards import (
    DiagonalInputMahalanobis,
    DiagonalMahalanobis,
    FixedMahalanobis,
)
from mbrl_bilevel.solvers.objectives import GaussianClosedForm
from mbrl_bilevel.solvers.updates import (
    FixedReward,
    ImplicitRefresh,
    InputPluginRefresh,
    PluginRefresh,
)
from mbrl_bilevel.training import FitConfig
from mbrl_bilevel.validation import ConfigError, check_positive
from mbrl_bilevel.variance_head import VarianceHeadFit

FIXED_REWARDS = ("pg-identity", "pg-scaled", "pg-raw-sigma")
DYNAMICS_LOSSES = (
    "mse",
    "nll",
    "nll-beta",
    *FIXED_REWARDS,
    "pg-plugin",
    "pg-plugin-input",
    "pg-plugin-input-beta",
    "bilevel",
    "bilevel-input",
)
ALIASES = {"pg": "pg-identity"}
ESTIMATORS = ("auto", "score", "pathwise")
PATHWISE_BY_DEFAULT = ("pg-plugin", "pg-plugin-input-beta")
"""The strategies whose pathwise gradient measured better offline than REINFORCE (docs: the
dynamics record); the estimator "auto" gives them pathwise and the other PG strategies score."""


@dataclass(frozen=True)
class PGOptions:
    """How the PG strategies train (λ, samples, estimator) and adapt their reward."""

    lam: float = 1.0
    """Entropy weight λ."""
    generations: int = 5
    """Samples G per input."""
    baseline: str = "mean"
    """Score-function baseline: none, mean (leave-one-out), grpo or min."""
    estimator: str = "auto"
    """auto (pathwise for pg-plugin and pg-plugin-input-beta, where it measured better offline;
    score for the other PG strategies), pathwise (reparameterised) or score (REINFORCE, the
    paper's)."""
    refresh_every: int = 50
    """Steps between reward updates (pg-plugin's refreshes, bilevel's outer steps)."""
    outer_lr: float = 0.05
    """Adam learning rate of the bilevel reward parameters."""
    hyper_batch: int = 1024
    """Rows of each split in one bilevel hypergradient."""
    beta: float = 0.5
    """β of nll-beta and pg-plugin-input-beta (the weights are variances to the power β)."""
    variance_phase: bool = True
    """pg-plugin-input-beta: fit the log-variance heads after the fit (variance_head.py)."""
    mean_phase: bool = True
    """pg-plugin-input-beta: refit the mean heads by least squares first (mean_head.py); a step
    of the variance phase, so variance_phase=False skips it too."""

    def __post_init__(self):
        check_positive(self.lam, "λ")
        if self.baseline not in BASELINES:
            raise ConfigError(f"unknown baseline {self.baseline!r}; choose from {BASELINES}")
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"unknown PG estimator {self.estimator!r}; choose from {ESTIMATORS}")
        for name in ("generations", "refresh_every", "hyper_batch"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")


def check_strategy(strategy: str) -> str:
    """The canonical name of a dynamics strategy (aliases resolved), or a ConfigError."""
    strategy = ALIASES.get(strategy, strategy)
    if strategy not in DYNAMICS_LOSSES:
        raise ConfigError(
            f"unknown dynamics loss {strategy!r}; choose from {(*DYNAMICS_LOSSES, *ALIASES)}"
        )
    return strategy


def resolve_estimator(strategy: str, estimator: str) -> str:
    """The PG estimator that `strategy` trains with under `estimator` ("auto" resolved)."""
    if estimator != "auto":
        return estimator
    return "pathwise" if check_strategy(strategy) in PATHWISE_BY_DEFAULT else "score"


def fixed_reward_matrix(strategy: str, train: Dataset, lam: float) -> torch.Tensor:
    """U [D, D] of a fixed-reward strategy (FIXED_REWARDS) from the training split."""
    eye = torch.eye(train.y.shape[1])
    data = Dataset(train.x.double(), train.y.double())
    if strategy == "pg-identity":
        return eye
    if strategy == "pg-scaled":
        return scaled_reward_scalar(residual_covariance(data), lam) * eye
    if strategy == "pg-raw-sigma":
        return optimal_reward_matrix(torch.cov(data.y.T).reshape(eye.shape), lam).float()
    raise ConfigError(f"{strategy!r} is not a fixed-reward PG strategy")


def _pg_loss(reward, options: PGOptions, estimator: str):
    if estimator == "pathwise":
        return PathwisePGLoss(reward, options.lam, options.generations)
    return PGLoss(reward, options.lam, options.generations, options.baseline)


def _reward_and_update(strategy: str, in_dim: int, out_dim: int, seed: int, options: PGOptions):
    initial = torch.full((out_dim,), 0.5 * options.lam)
    if strategy in FIXED_REWARDS:
        reward = FixedMahalanobis(torch.eye(out_dim))
        return reward, FixedReward(
            reward, lambda train: fixed_reward_matrix(strategy, train, options.lam)
        )
    if strategy == "pg-plugin":
        reward = FixedMahalanobis(torch.diag(initial))
        return reward, PluginRefresh(reward, options.lam, "diag", options.refresh_every)
    if strategy in ("pg-plugin-input", "pg-plugin-input-beta"):
        reward = DiagonalInputMahalanobis(in_dim, torch.diag(initial))
        return reward, InputPluginRefresh(reward, options.lam, options.refresh_every)
    if strategy == "bilevel":
        reward = DiagonalMahalanobis(initial)
    else:
        reward = DiagonalInputMahalanobis(in_dim, torch.diag(initial))
    update = ImplicitRefresh(
        reward,
        GaussianClosedForm(options.lam),
        every=options.refresh_every,
        batch_size=options.hyper_batch,
        outer_lr=options.outer_lr,
        seed=seed,
    )
    return reward, update


def make_loss(strategy: str, in_dim: int, out_dim: int, seed: int = 0, options=None):
    """(loss, reward update or None) of `strategy` for a model with in_dim inputs and out_dim
    Gaussian outputs."""
    strategy = check_strategy(strategy)
    options = options or PGOptions()
    if strategy == "mse":
        return MSELoss(), None
    if strategy == "nll":
        return NLLLoss(), None
    if strategy == "nll-beta":
        return BetaNLLLoss(options.beta), None
    reward, update = _reward_and_update(strategy, in_dim, out_dim, seed, options)
    estimator = resolve_estimator(strategy, options.estimator)
    if strategy == "pg-plugin-input-beta":
        loss = BetaPGLoss(reward, options.lam, options.generations, options.beta, estimator)
        return loss, update
    return _pg_loss(reward, options, estimator), update


def make_dynamics_learner(
    strategy: str,
    config: FitConfig,
    in_dim: int,
    out_dim: int,
    seed: int = 0,
    writer=None,
    options: PGOptions | None = None,
    progress: bool | None = None,
) -> EnsembleLearner:
    """The learner that trains a GaussianEnsemble (inputs in_dim, targets out_dim) with
    `strategy` (DYNAMICS_LOSSES or an alias). Early stopping and elites use held-out RMSE for mse,
    NLL otherwise; mse trains no variance, so it gets no log-variance penalty."""
    strategy = check_strategy(strategy)
    options = options or PGOptions()
    loss, update = make_loss(strategy, in_dim, out_dim, seed, options)
    phase = strategy == "pg-plugin-input-beta" and options.variance_phase
    finish = VarianceHeadFit(update, options.lam, mean_phase=options.mean_phase) if phase else None
    config = dataclasses.replace(config, select_on="rmse" if strategy == "mse" else "nll")
    return EnsembleLearner(
        loss,
        config,
        penalty=0.0 if strategy == "mse" else LOG_VAR_PENALTY,
        seed=seed,
        writer=writer,
        progress=progress,
        description=f"model ({strategy})",
        update=update,
        finish=finish,
    )
