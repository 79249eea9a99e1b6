"""Dynamics learners by name, for agents: `make_dynamics_learner("nll", ...)` returns an object
with fit(ensemble, train, val) -> metrics. Agents never branch on which learner they hold."""

from __future__ import annotations

from mbrl_bilevel.ensemble import EnsembleLearner
from mbrl_bilevel.losses import BetaNLLLoss, MSELoss, NLLLoss
from mbrl_bilevel.training import FitConfig
from mbrl_bilevel.validation import ConfigError

DYNAMICS_LOSSES = ("mse", "nll", "nll-beta")


def make_dynamics_learner(strategy: str, config: FitConfig, seed: int = 0, writer=None):
    """The learner that trains a GaussianEnsemble with `strategy` (one of DYNAMICS_LOSSES)."""
    losses = {"mse": MSELoss, "nll": NLLLoss, "nll-beta": BetaNLLLoss}
    if strategy not in losses:
        raise ConfigError(f"unknown dynamics loss {strategy!r}; choose from {DYNAMICS_LOSSES}")
    select_on = "rmse" if strategy == "mse" else "nll"
    config = FitConfig(**{**config.__dict__, "select_on": select_on})
    return EnsembleLearner(
        losses[strategy](), config, seed=seed, writer=writer, description=f"model ({strategy})"
    )
