"""The inner loop shared by every learner: Adam over full batches or minibatches, gradient-norm
clipping, periodic validation with early stopping (best weights restored), TensorBoard scalars
`train/...` and `val/...`, and a progress bar."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributions import Categorical, Distribution
from tqdm.auto import tqdm

from mbrl_bilevel.data import Dataset
from mbrl_bilevel.validation import ConfigError

Loss = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]
Monitor = Callable[[nn.Module], dict[str, float]]
StepHook = Callable[[int, nn.Module], dict[str, float]]


@dataclass(frozen=True)
class FitConfig:
    """How one call of `fit` trains a predictor."""

    steps: int = 1000
    """Number of gradient steps."""
    lr: float = 1e-3
    """Adam learning rate."""
    batch_size: int | None = None
    """Minibatch size; None trains on the full batch."""
    clip_grad_norm: float | None = None
    """Clip the gradient's global norm to this value; None does not clip."""
    weight_decay: float = 0.0
    """Adam (L2) weight decay."""
    lr_schedule: str = "constant"
    """'constant' or 'cosine' (decay to 0 over `steps`)."""
    eval_every: int = 10
    """Validate (and call the monitor) every this many steps."""
    patience: int | None = None
    """Stop after this many validations without improvement; None never stops early."""
    select_on: str = "nll"
    """Validation metric (lower is better) used for early stopping and the best weights."""

    def __post_init__(self):
        if self.steps <= 0:
            raise ConfigError(f"steps must be > 0, got {self.steps}")
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be > 0, got {self.lr}")
        if self.batch_size is not None and self.batch_size <= 0:
            raise ConfigError(f"batch_size must be > 0, got {self.batch_size}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"lr_schedule must be constant or cosine, got {self.lr_schedule!r}")
        if self.eval_every <= 0:
            raise ConfigError(f"eval_every must be > 0, got {self.eval_every}")


@torch.no_grad()
def evaluate(predictor: nn.Module, data: Dataset) -> dict[str, float]:
    """Held-out metrics: nll (per sample) always; rmse for real targets, accuracy for classes."""
    dist = predictor(data.x)
    metrics = {"nll": float(-dist.log_prob(data.y).mean())}
    if isinstance(dist, Categorical):
        metrics["accuracy"] = float((dist.probs.argmax(-1) == data.y).float().mean())
    else:
        metrics["rmse"] = float((dist.mean - data.y).pow(2).mean().sqrt())
    return metrics


def heldout_metrics(dist: Distribution, y: torch.Tensor) -> dict[str, float]:
    """rmse, nll per dimension, cal1, cal2 of a predictive distribution (batch [B], event D)."""
    error = (dist.mean.detach() - y).abs()
    std = dist.variance.detach().sqrt()
    return {
        "rmse": float(error.pow(2).mean().sqrt()),
        "nll": float(-dist.log_prob(y).detach().mean() / y.shape[1]),
        "cal1": float((error <= std).float().mean()),
        "cal2": float((error <= 2 * std).float().mean()),
    }


@dataclass
class FitResult:
    """What `fit` returns: the final validation metrics, when the best weights were seen, and the
    history of every validation round as rows {step, val/..., monitor keys}."""

    metrics: dict[str, float]
    best_step: int
    history: list[dict[str, float]] = field(default_factory=list)


def fit(
    predictor: nn.Module,
    loss: Loss,
    train: Dataset,
    val: Dataset | None,
    config: FitConfig,
    *,
    writer=None,
    step_offset: int = 0,
    monitor: Monitor | None = None,
    generator: torch.Generator | None = None,
    batches: Iterator[Dataset] | None = None,
    progress: bool | None = None,
    description: str = "fit",
    on_step: StepHook | None = None,
) -> FitResult:
    """Train `predictor` in place by minimising `loss` on `train`.

    Validation on `val` (and `monitor(predictor)`, if given) runs every `eval_every` steps and at
    the end; with a val split the weights with the lowest `select_on` metric are restored.
    `batches` (endless) replaces the default shuffled minibatches of `train` (an ensemble's
    per-member bootstrap batches). `on_step(step, predictor)` runs after every optimiser step
    (a reward update); the `group/key` scalars it returns go to TensorBoard. `progress=None`
    shows a bar only on a terminal. Returns a FitResult.
    """
    if len(train) == 0:
        raise ConfigError("the training split is empty")
    if val is not None and len(val) == 0:
        raise ConfigError("the validation split is empty")
    generator = generator or torch.Generator().manual_seed(0)
    params = [p for p in predictor.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    schedule = _schedule(optimizer, config)
    history: list[dict[str, float]] = []
    best = (math.inf, 0, copy.deepcopy(predictor.state_dict()))
    rounds_since_best = 0
    if batches is None:
        batches = _endless_batches(train, config.batch_size, generator)
    bar = tqdm(
        range(1, config.steps + 1), desc=description, disable=_bar_disabled(progress), leave=False
    )
    for step in bar:
        batch = next(batches)
        value, metrics = loss(predictor, batch.x, batch.y)
        if not torch.isfinite(value):
            raise FloatingPointError(
                f"{description}: the loss became {value.item()} at step {step}"
            )
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        if config.clip_grad_norm is not None:
            metrics["grad_norm"] = float(nn.utils.clip_grad_norm_(params, config.clip_grad_norm))
        optimizer.step()
        schedule.step()
        _log(writer, "train", {"loss": value.item(), **metrics}, step_offset + step)
        if on_step is not None:
            log_scalars(writer, on_step(step, predictor), step_offset + step)
        if step % config.eval_every and step != config.steps:
            continue
        row: dict[str, float] = {"step": float(step)}
        if val is not None:
            row |= {f"val/{k}": v for k, v in evaluate(predictor, val).items()}
        if monitor is not None:
            row |= monitor(predictor)
        history.append(row)
        log_scalars(writer, row, step_offset + step)
        bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k != "step"}, refresh=False)
        if val is None:
            continue
        score = row[f"val/{config.select_on}"]
        if score < best[0]:
            best, rounds_since_best = (score, step, copy.deepcopy(predictor.state_dict())), 0
        else:
            rounds_since_best += 1
            if config.patience is not None and rounds_since_best >= config.patience:
                break
    bar.close()
    if val is None:
        return FitResult(history[-1] if history else {}, step, history)
    predictor.load_state_dict(best[2])
    final = {f"val/{k}": v for k, v in evaluate(predictor, val).items()}
    return FitResult(final, best[1], history)


class LossLearner:
    """The nll, mse and pg strategies: fit a predictor by minimising one loss; `update`
    (solvers.updates) adapts a PG loss's reward: start(predictor, train, val), then after each step.
    With select_best=False, `val` feeds only the update: no validation, the final weights are kept.

    Consecutive calls of `fit` (an agent retraining its model) log on one continuing step axis.
    """

    def __init__(
        self,
        loss: Loss,
        config: FitConfig,
        writer=None,
        progress: bool | None = None,
        update=None,
        select_best: bool = True,
    ):
        self.loss, self.config, self.writer, self.progress = loss, config, writer, progress
        self.update, self.select_best = update, select_best
        self.global_step = 0

    def fit(self, predictor: nn.Module, train: Dataset, val: Dataset | None) -> dict[str, float]:
        if self.update is not None:
            self.update.start(predictor, train, val)
        result = fit(
            predictor,
            self.loss,
            train,
            val if self.select_best else None,
            self.config,
            writer=self.writer,
            step_offset=self.global_step,
            progress=self.progress,
            on_step=self.update,
        )
        self.global_step += self.config.steps
        return result.metrics


def _schedule(optimizer: torch.optim.Optimizer, config: FitConfig):
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _endless_batches(data: Dataset, batch_size: int | None, generator: torch.Generator):
    while True:
        yield from data.batches(batch_size, generator)


def _bar_disabled(progress: bool | None) -> bool | None:
    return None if progress is None else not progress


def _log(writer, group: str, metrics: dict[str, float], step: int) -> None:
    log_scalars(writer, {f"{group}/{key}": value for key, value in metrics.items()}, step)


def log_scalars(writer, row: dict[str, float], step: int) -> None:
    """Write a row's scalars (bare keys under eval/; the row's own "step" is skipped)."""
    if writer is None:
        return
    for key, value in row.items():
        if key != "step":
            writer.add_scalar(key if "/" in key else f"eval/{key}", value, step)
