"""The offline dynamics benchmark: p(s' | s, a) learned from a transition dataset by each training
strategy, compared on held-out test RMSE, NLL per dimension, calibration and open-loop rollouts.

Two protocols:
- default (the toolkit's): a GaussianEnsemble (E members, 4 × 200 SiLU) on Δ-state targets with
  input/target normalisation, minibatches, bootstrap, holdout early stopping and elites; 70/10/20
  split. Losses and reward matrices U live in normalised target units.
- paper (SPEC section 5): one GaussianMLP [64, 64] with state-dependent std on absolute
  next-state targets, no normalisation, 50/20/30 split, 400 full-batch Adam updates (lr 1e-3,
  gradient-norm clip 10), final weights, λ = 1, G = 5.

Metrics (test split, raw target units): rmse of the predicted mean; nll per dimension; cal1 and
cal2, the share of target components inside μ ± 1σ and μ ± 2σ (0.683 and 0.954 when calibrated);
rollout_rmse, the RMSE of the state predicted `horizon` steps ahead open-loop from the mean, on
windows of consecutive transitions starting in the test split. An ensemble predicts with the
uniform mixture of its elites. MSE trains no variance: its NLL and calibration use one diagonal
variance fitted on the validation residuals. With --calibrate, every strategy's predictive
variances are then rescaled by one factor per output dimension fitted on the validation split
(calibration.py; a no-op for MSE's, which is already the maximum-likelihood variance there).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.distributions import Distribution, Independent, Normal
from torch.utils.tensorboard import SummaryWriter

from mbrl_bilevel.calibration import fit_variance_scale, scale_variance
from mbrl_bilevel.data import Dataset, random_split
from mbrl_bilevel.ensemble import GaussianEnsemble
from mbrl_bilevel.learners import (
    DYNAMICS_LOSSES,
    ESTIMATORS,
    PGOptions,
    make_dynamics_learner,
    make_loss,
)
from mbrl_bilevel.losses import BASELINES
from mbrl_bilevel.models import GaussianMLP
from mbrl_bilevel.parallel import map_seeds
from mbrl_bilevel.training import FitConfig, LossLearner, heldout_metrics
from mbrl_bilevel.transitions import Transitions
from mbrl_bilevel.validation import ConfigError, check_positive

STRATEGIES = DYNAMICS_LOSSES
METRICS = ("rmse", "nll", "cal1", "cal2", "rollout_rmse")


@dataclass(frozen=True)
class DynamicsConfig:
    """The offline dynamics benchmark (`mbrl-bilevel dynamics`)."""

    dataset: str | None = None
    """A .npz transition file or a Minari dataset id; none: collect a HalfCheetah-v5 random-policy
    dataset of --collect-steps transitions."""
    strategies: str = ",".join(STRATEGIES)
    """Comma-separated strategies: mse, nll, nll-beta, pg-identity, pg-scaled, pg-raw-sigma,
    pg-plugin, pg-plugin-input, pg-plugin-input-beta, bilevel, bilevel-input."""
    seeds: int = 5
    """Seeds (each: its own split, initialisation and sampling)."""
    protocol: str = "default"
    """'default' (ensemble, Δ targets, normalisation, early stopping) or 'paper' (SPEC section 5)."""
    fraction: float = 1.0
    """Share of the dataset's transitions used, taken from its start (the reference used 0.1)."""
    lam: float = 1.0
    """Entropy weight λ of the PG strategies."""
    generations: int = 5
    """Samples G per input of the PG strategies."""
    baseline: str = "mean"
    """PG baseline: none, mean (leave-one-out), grpo or min."""
    estimator: str = "auto"
    """PG gradient estimator: auto (pathwise for pg-plugin and pg-plugin-input-beta, where it
    measured better; score for the other PG strategies), score (REINFORCE, the paper's) or
    pathwise (reparameterised)."""
    refresh_every: int = 50
    """Steps between reward updates of pg-plugin and pg-plugin-input(-beta) (refreshes) and
    bilevel (outer steps)."""
    outer_lr: float = 0.05
    """Adam learning rate of the bilevel reward parameters."""
    beta: float = 0.5
    """β of nll-beta and pg-plugin-input-beta (weights: variances to the power β)."""
    variance_phase: bool = True
    """pg-plugin-input-beta, default protocol: after the fit, fit the members' log-variance heads
    alone to the plug-in's variances (variance_head.py)."""
    mean_phase: bool = True
    """pg-plugin-input-beta, with the variance phase: first refit the members' mean heads by least
    squares on the frozen trunk (mean_head.py)."""
    steps: int | None = None
    """Gradient steps; none: 400 (paper) or 4000 with early stopping (default)."""
    lr: float = 1e-3
    """Adam learning rate."""
    batch_size: int = 256
    """Minibatch size per member (default protocol; the paper protocol is full batch)."""
    members: int = 7
    """Ensemble members E (default protocol)."""
    elites: int = 5
    """Elite members used for prediction (default protocol)."""
    hidden: str = "200,200,200,200"
    """Hidden widths of each member (default protocol)."""
    eval_every: int = 100
    """Validate every this many steps (default protocol)."""
    patience: int = 8
    """Early stopping after this many validations without improvement (default protocol)."""
    calibrate: bool = False
    """Rescale each strategy's predictive variances by per-dimension factors fitted on the
    validation split (σ scaling) before the test metrics; the factors' geometric mean is reported
    as variance_scale."""
    horizon: int = 10
    """Open-loop rollout length for rollout_rmse."""
    rollouts: int = 1000
    """Maximum number of rollout windows per seed."""
    collect_steps: int = 20_000
    """Transitions to collect when no dataset is given."""
    name: str | None = None
    """Run name; default dynamics-<date>-<time>."""
    out_dir: str = "runs"
    """Parent folder of run folders."""
    threads: int = 1
    """Torch threads per process."""
    jobs: int = 2
    """Seeds run in parallel processes."""

    def strategy_list(self) -> list[str]:
        chosen = [s.strip() for s in self.strategies.split(",") if s.strip()]
        unknown = [s for s in chosen if s not in STRATEGIES]
        if unknown or not chosen:
            raise ConfigError(f"unknown strategies {unknown or chosen}; choose from {STRATEGIES}")
        return chosen

    def hidden_sizes(self) -> tuple[int, ...]:
        try:
            sizes = tuple(int(v) for v in self.hidden.split(","))
        except ValueError:
            raise ConfigError(f"--hidden must look like '200,200', got {self.hidden!r}") from None
        if not sizes or min(sizes) <= 0:
            raise ConfigError(f"--hidden widths must be > 0, got {self.hidden!r}")
        return sizes

    def resolved_steps(self) -> int:
        return self.steps if self.steps is not None else (400 if self.paper else 4000)

    @property
    def paper(self) -> bool:
        return self.protocol == "paper"

    def validate(self) -> None:
        if self.protocol not in ("default", "paper"):
            raise ConfigError(f"--protocol must be default or paper, got {self.protocol!r}")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"--fraction must be in (0, 1], got {self.fraction}")
        check_positive(self.lam, "--lam (entropy weight λ)")
        if self.baseline not in BASELINES:
            raise ConfigError(f"unknown --baseline {self.baseline!r}; choose from {BASELINES}")
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"unknown --estimator {self.estimator!r}; choose from {ESTIMATORS}")
        for name in ("seeds", "generations", "batch_size", "members", "elites", "horizon"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0")
        if self.elites > self.members:
            raise ConfigError(f"--elites ({self.elites}) cannot exceed --members ({self.members})")
        if self.resolved_steps() <= 0:
            raise ConfigError(f"--steps must be > 0, got {self.steps}")
        self.strategy_list()
        self.hidden_sizes()


# ---------------------------------------------------------------- models and strategies


def make_model(config: DynamicsConfig, in_dim: int, out_dim: int) -> nn.Module:
    if config.paper:
        return GaussianMLP(in_dim, out_dim, hidden=(64, 64))
    return GaussianEnsemble(
        in_dim, out_dim, config.members, config.elites, hidden=config.hidden_sizes()
    )


def pg_options(config: DynamicsConfig) -> PGOptions:
    return PGOptions(
        lam=config.lam,
        generations=config.generations,
        baseline=config.baseline,
        estimator=config.estimator,
        refresh_every=config.refresh_every,
        outer_lr=config.outer_lr,
        beta=config.beta,
        variance_phase=config.variance_phase,
        mean_phase=config.mean_phase,
    )


def train_strategy(
    strategy: str,
    model: nn.Module,
    train: Dataset,
    val: Dataset,
    config: DynamicsConfig,
    seed: int,
    writer=None,
):
    """Fit `model` in place with `strategy` (TensorBoard train/, val/ and reward/ scalars to
    `writer`); returns the learner's metrics. The paper protocol trains on the full batch and
    keeps the final weights (its held-out split still drives pg-plugin and bilevel)."""
    in_dim, out_dim = train.x.shape[1], train.y.shape[1]
    if config.paper:
        fit_config = FitConfig(
            steps=config.resolved_steps(), lr=config.lr, clip_grad_norm=10.0, eval_every=50
        )
        loss, update = make_loss(strategy, in_dim, out_dim, seed, pg_options(config))
        learner = LossLearner(
            loss, fit_config, writer, progress=False, update=update, select_best=False
        )
        return learner.fit(model, train, val)
    fit_config = FitConfig(
        steps=config.resolved_steps(),
        lr=config.lr,
        batch_size=config.batch_size,
        eval_every=config.eval_every,
        patience=config.patience,
    )
    learner = make_dynamics_learner(
        strategy, fit_config, in_dim, out_dim, seed, writer, pg_options(config), progress=False
    )
    return learner.fit(model, train, val)


# ---------------------------------------------------------------- metrics


def predictive(model: nn.Module, x: torch.Tensor) -> Distribution:
    """p(y | x) with batch [B], event D: an ensemble's elite mixture, else the model's output."""
    return model.mixture(x) if isinstance(model, GaussianEnsemble) else model(x)


@torch.no_grad()
def homoscedastic(model: nn.Module, val: Dataset):
    """For MSE-trained models: x -> N(mean(x), diag v), v the mean squared validation residual."""
    variance = (predictive(model, val.x).mean - val.y).pow(2).mean(0)

    def distribution(x: torch.Tensor) -> Distribution:
        mean = predictive(model, x).mean
        return Independent(Normal(mean, variance.sqrt().expand_as(mean)), 1)

    return distribution


def calibrated(predict, factor: torch.Tensor):
    """x -> predict(x) with the variances of output dimension d multiplied by factor[d] ([D])."""
    return lambda x: scale_variance(predict(x), factor)


@torch.no_grad()
def rollout_starts(transitions: Transitions, horizon: int) -> np.ndarray:
    """Indices i whose transitions i .. i+horizon-1 are consecutive steps of one episode."""
    links = (
        ~transitions.terminations[:-1]
        & ~transitions.truncations[:-1]
        & np.all(transitions.next_observations[:-1] == transitions.observations[1:], axis=1)
    )
    broken = np.concatenate([[0], np.cumsum(~links)])  # broken[i] = breaks among links < i
    starts = np.arange(len(transitions) - horizon + 1)
    return starts[broken[starts + horizon - 1] == broken[starts]]


@torch.no_grad()
def rollout_rmse(
    predict, transitions: Transitions, starts: np.ndarray, horizon: int, delta: bool
) -> float:
    """RMSE of the state `horizon` steps ahead, predicted open-loop from the mean."""
    state = torch.as_tensor(transitions.observations[starts])
    for k in range(horizon):
        action = torch.as_tensor(transitions.actions[starts + k])
        mean = predict(torch.cat([state, action], dim=1)).mean
        state = state + mean if delta else mean
    target = torch.as_tensor(transitions.next_observations[starts + horizon - 1])
    return float((state - target).pow(2).mean().sqrt())


# ---------------------------------------------------------------- one seed, the study


def split(n: int, paper: bool, generator: torch.Generator) -> list[torch.Tensor]:
    """Random disjoint index sets (train, val, test): 50/20/30 (paper) or 70/10/20."""
    index = torch.arange(n)
    fractions = (0.5, 0.2, 0.3) if paper else (0.7, 0.1, 0.2)
    return [part.y for part in random_split(Dataset(index[:, None], index), fractions, generator)]


def run_seed(seed: int, config: DynamicsConfig, transitions: Transitions, tb_dir: str | None):
    """Every strategy on one seed's split and initialisation; returns one row per strategy."""
    torch.set_num_threads(config.threads)
    data = transitions.model_dataset(delta=not config.paper)
    generator = torch.Generator().manual_seed(seed)
    train_index, val_index, test_index = split(len(data), config.paper, generator)
    train, val, test = (data.subset(i) for i in (train_index, val_index, test_index))
    starts = rollout_starts(transitions, config.horizon)
    starts = starts[np.isin(starts, test_index.numpy())]
    rng = np.random.default_rng(seed)
    starts = rng.permutation(starts)[: config.rollouts]
    rows = []
    for strategy in config.strategy_list():
        torch.manual_seed(seed)
        model = make_model(config, data.x.shape[1], data.y.shape[1])
        writer = SummaryWriter(f"{tb_dir}/{strategy}-seed{seed}") if tb_dir else None
        start = time.perf_counter()
        learned = train_strategy(strategy, model, train, val, config, seed, writer)
        seconds = time.perf_counter() - start
        predict = (
            homoscedastic(model, val)
            if strategy == "mse"
            else (lambda x, model=model: predictive(model, x))
        )
        factor = torch.ones(data.y.shape[1])
        if config.calibrate:
            with torch.no_grad():
                heldout = predict(val.x)
            factor = fit_variance_scale(heldout, val.y)
            predict = calibrated(predict, factor)
        row = {"strategy": strategy, "seed": seed, **heldout_metrics(predict(test.x), test.y)}
        row["rollout_rmse"] = (
            rollout_rmse(predict, transitions, starts, config.horizon, not config.paper)
            if len(starts)
            else float("nan")
        )
        row |= {
            "variance_scale": float(factor.log().mean().exp()),
            "train_seconds": seconds,
            "best_step": learned.get("best_step", float("nan")),
        }
        rows.append(row)
        if writer is not None:
            for key in METRICS:
                writer.add_scalar(f"test/{key}", row[key], 0)
            writer.close()
    return rows


def run_study(config: DynamicsConfig, transitions: Transitions):
    """Run every (seed, strategy), write the run folder; returns (run_dir, summary, table)."""
    from mbrl_bilevel.reporting import markdown_table, summary_table
    from mbrl_bilevel.runs import (
        atomic_write_text,
        create_run_dir,
        save_figure,
        write_csv,
        write_json,
    )

    config.validate()
    if config.fraction < 1:
        transitions = transitions.subset(np.arange(max(1, int(len(transitions) * config.fraction))))
    if len(transitions) < 20:
        raise ConfigError(f"the dataset has {len(transitions)} transitions; need at least 20")
    run_dir = create_run_dir(config.out_dir, config.name, "dynamics")
    write_json(run_dir / "config.json", config)
    results = map_seeds(
        run_seed,
        config.seeds,
        config.jobs,
        desc="dynamics seeds",
        config=config,
        transitions=transitions,
        tb_dir=str(run_dir / "tb"),
    )
    rows = [row for seed_rows in results for row in seed_rows]
    header, table, numbers = summary_table(rows, "strategy", METRICS)
    text = markdown_table(header, table)
    write_csv(run_dir / "metrics.csv", rows)
    atomic_write_text(run_dir / "table.md", text + "\n")
    save_figure(plot_metrics(numbers), run_dir / "plots" / "dynamics.png")
    summary = {
        "command": "dynamics",
        "run_dir": str(run_dir),
        "protocol": config.protocol,
        "transitions": len(transitions),
        "obs_dim": transitions.obs_dim,
        "action_dim": transitions.action_dim,
        "seeds": config.seeds,
        "final": numbers,
    }
    write_json(run_dir / "summary.json", summary)
    return run_dir, summary, text


TITLES = {
    "rmse": "test RMSE",
    "nll": "test NLL per dim",
    "cal1": "share in μ ± 1σ (0.683)",
    "cal2": "share in μ ± 2σ (0.954)",
    "rollout_rmse": "open-loop rollout RMSE",
}


def plot_metrics(numbers: dict[str, dict[str, dict[str, float]]]):
    """One bar panel per metric: mean ± std over seeds for each strategy."""
    import matplotlib.pyplot as plt

    strategies = list(numbers)
    figure, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 3.2))
    for ax, metric in zip(axes, METRICS, strict=True):
        means = [numbers[s].get(metric, {}).get("mean", np.nan) for s in strategies]
        stds = [numbers[s].get(metric, {}).get("std", 0.0) for s in strategies]
        ax.bar(range(len(strategies)), means, yerr=stds, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(strategies)), strategies, rotation=60, ha="right", fontsize=8)
        ax.set_title(TITLES[metric], fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return figure
