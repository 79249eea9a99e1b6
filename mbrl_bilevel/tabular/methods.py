"""The training methods of the tabular study, each fitting a categorical predictor in place.

- nll: cross-entropy.
- pg: PG under the one-hot reward U = βI (β = 1 by default: r = -2·[ŷ ≠ y]).
- pg-star: PG under U = β*I, β* = λC / (2 tr Σ̂), tr Σ̂ = N/(N-1)·(1 - Σ_k p_k²) from the
  training class frequencies p_k (SPEC section 2).
- pg-plugin: PG under U from the covariance of the held-out residuals e_y - p_θ(·|x), refreshed
  during training (the solvers' plug-in learner, on a one-hot view of the data).
- bilevel: PG under U learned by implicit differentiation of the held-out NLL, with the exact
  categorical expectation as the differentiable inner objective.

Every method gets the same budget of `steps` PG/NLL steps and returns the final weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributions import Distribution, OneHotCategorical
from torch.nn import functional as F

from mbrl_bilevel.data import Dataset
from mbrl_bilevel.losses import NLLLoss, PGLoss
from mbrl_bilevel.models import CategoricalLogistic, CategoricalMLP
from mbrl_bilevel.rewards import FixedMahalanobis, OneHotReward, make_mahalanobis
from mbrl_bilevel.tabular.data import Splits
from mbrl_bilevel.training import FitConfig, evaluate, fit

METHODS = ("nll", "pg", "pg-star", "pg-plugin", "bilevel")
SOLVER_METHODS = ("pg-plugin", "bilevel")
MODELS = ("logistic", "mlp")


@dataclass(frozen=True)
class MethodOptions:
    """What every method shares (library arguments; the CLI config maps onto them)."""

    lam: float = 10.0
    beta: float = 1.0
    generations: int = 50
    baseline: str = "mean"
    steps: int = 300
    lr: float = 0.04
    batch_size: int | None = None
    eval_every: int = 10
    bilevel_reward: str = "scalar"
    inner_steps: int = 20
    outer_lr: float = 0.05
    refresh_every: int = 20
    damping: float = 0.1


def make_model(kind: str, in_dim: int, num_classes: int, hidden: tuple[int, ...]) -> nn.Module:
    """A categorical predictor: logistic regression or an MLP with `hidden` widths."""
    if kind == "logistic":
        return CategoricalLogistic(in_dim, num_classes)
    return CategoricalMLP(in_dim, num_classes, hidden)


def class_frequency_trace(y: torch.Tensor, num_classes: int) -> float:
    """tr Σ̂ of the one-hot labels: N/(N-1)·(1 - Σ_k p_k²) with p_k the class frequencies."""
    n = len(y)
    p = torch.bincount(y, minlength=num_classes).double() / n
    return float(n / (n - 1) * (1 - (p**2).sum()))


def beta_star(y: torch.Tensor, num_classes: int, lam: float) -> float:
    """β* = λC / (2 tr Σ̂) for the reward U = β*I on one-hot labels y [N]."""
    return lam * num_classes / (2 * class_frequency_trace(y, num_classes))


def one_hot_reward(beta: float, num_classes: int) -> OneHotReward:
    """r(ŷ, y) = -2β·[ŷ ≠ y], the one-hot Mahalanobis reward with U = βI."""
    return OneHotReward(FixedMahalanobis(beta * torch.eye(num_classes)))


def curve_monitor(val: Dataset):
    """monitor(predictor) -> held-out accuracy and NLL for the learning curves."""

    def monitor(predictor: nn.Module) -> dict[str, float]:
        return {f"curve/{key}": value for key, value in evaluate(predictor, val).items()}

    return monitor


def train_method(
    method: str,
    predictor: nn.Module,
    splits: Splits,
    options: MethodOptions,
    seed: int,
    writer=None,
) -> tuple[list[dict[str, float]], float | None]:
    """Fit `predictor` in place by `method`; return (learning-curve rows {step, curve/...}, the
    final reward scale β = mean diag U, None for nll)."""
    num_classes = predictor.num_classes
    monitor = curve_monitor(splits.val)
    if method in SOLVER_METHODS:
        return _train_with_solver(method, predictor, splits, options, writer, monitor)
    if method == "nll":
        loss, beta = NLLLoss(), None
    else:
        beta = (
            options.beta if method == "pg" else beta_star(splits.train.y, num_classes, options.lam)
        )
        loss = PGLoss(
            one_hot_reward(beta, num_classes), options.lam, options.generations, options.baseline
        )
    config = FitConfig(
        steps=options.steps,
        lr=options.lr,
        batch_size=options.batch_size,
        eval_every=options.eval_every,
    )
    result = fit(
        predictor,
        loss,
        splits.train,
        None,
        config,
        writer=writer,
        monitor=monitor,
        generator=torch.Generator().manual_seed(seed),
        progress=False,
        description=method,
    )
    return result.history, beta


class OneHotView(nn.Module):
    """The same predictor seen as a distribution over one-hot vectors (OneHotCategorical): its
    mean is p_θ(·|x), so the plug-in's residuals y - μ_θ(x) are e_y - p_θ(·|x), and a Mahalanobis
    reward on its samples is the one-hot reward."""

    def __init__(self, predictor: nn.Module):
        super().__init__()
        self.predictor = predictor

    def forward(self, x: torch.Tensor) -> Distribution:
        return OneHotCategorical(logits=self.predictor(x).logits, validate_args=False)


def one_hot_targets(data: Dataset, num_classes: int) -> Dataset:
    """The split with labels y [N] replaced by one-hot vectors [N, C]."""
    return Dataset(data.x, F.one_hot(data.y, num_classes).to(data.x.dtype))


def _train_with_solver(method, predictor, splits, options, writer, monitor):
    """pg-plugin and bilevel through the learners of mbrl_bilevel.solvers (issue 3)."""
    from mbrl_bilevel.solvers.bilevel import BilevelLearner
    from mbrl_bilevel.solvers.linear import LinearSolverConfig
    from mbrl_bilevel.solvers.objectives import CategoricalExact
    from mbrl_bilevel.solvers.plugin import PluginLearner

    num_classes = predictor.num_classes
    common = dict(generations=options.generations, baseline=options.baseline)
    if method == "pg-plugin":
        learner = PluginLearner(
            "scalar",
            options.lam,
            options.steps,
            refresh_every=options.refresh_every,
            lr=options.lr,
            split="val",
            writer=writer,
            monitor=lambda view: monitor(view.predictor),
            **common,
        )
        train, val = (one_hot_targets(d, num_classes) for d in (splits.train, splits.val))
        learner.fit(OneHotView(predictor), train, val)
        return learner.history, float(learner.reward.matrix().diagonal().mean().detach())
    initial = beta_star(splits.train.y, num_classes, options.lam) * torch.eye(num_classes)
    reward = OneHotReward(make_mahalanobis(options.bilevel_reward, initial))
    learner = BilevelLearner(
        reward,
        CategoricalExact(options.lam),
        outer_steps=max(1, options.steps // options.inner_steps),
        inner_steps=options.inner_steps,
        inner_lr=options.lr,
        outer_lr=options.outer_lr,
        linear=LinearSolverConfig(damping=options.damping, warm_start=False),
        writer=writer,
        monitor=monitor,
        **common,
    )
    learner.fit(predictor, splits.train, splits.val)
    return learner.history, float(reward.matrix().diagonal().mean().detach())
