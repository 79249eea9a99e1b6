"""Warm-started inner steps and the reward diagnostics shared by the solvers."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mbrl_bilevel.data import Dataset
from mbrl_bilevel.rewards import InputDependentMahalanobis
from mbrl_bilevel.training import Loss, evaluate

UStar = Callable[[torch.Tensor], torch.Tensor]


class InnerSteps:
    """Adam on `loss` (e.g. PGLoss) for a predictor, keeping the optimiser state across calls of
    `run` (the outer loop warm-starts θ and its moments). With `cosine_steps`, the learning rate
    decays to 0 over that many steps (PG noise in θ, hence in S, then fades)."""

    def __init__(
        self,
        predictor: nn.Module,
        loss: Loss,
        lr: float,
        cosine_steps: int | None = None,
    ):
        self.predictor, self.loss = predictor, loss
        self.params = [p for p in predictor.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=lr)
        self.schedule = (
            torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, cosine_steps)
            if cosine_steps
            else None
        )

    def run(self, train: Dataset, steps: int) -> dict[str, float]:
        """`steps` full-batch Adam steps on `train`; returns the last step's metrics."""
        metrics: dict[str, float] = {}
        for step in range(steps):
            value, metrics = self.loss(self.predictor, train.x, train.y)
            if not torch.isfinite(value):
                raise FloatingPointError(f"inner loss became {value.item()} at inner step {step}")
            self.optimizer.zero_grad(set_to_none=True)
            value.backward()
            self.optimizer.step()
            if self.schedule is not None:
                self.schedule.step()
            metrics = {"loss": value.item(), **metrics}
        return metrics


@torch.no_grad()
@torch.no_grad()
def reward_diagnostics(
    reward: nn.Module, x: torch.Tensor, u_star: UStar | None = None
) -> dict[str, float]:
    """reward/u_eig_min, reward/u_eig_max over the inputs x [B, in] (one matrix if U is constant)
    and reward/u_star_error = mean_x ‖U(x) - U*(x)‖_F / ‖U*(x)‖_F when u_star (x -> [D, D] or
    [B, D, D]) is given."""
    U = reward.matrix_at(x)
    eig = torch.linalg.eigvalsh(U)
    row = {"reward/u_eig_min": float(eig.min()), "reward/u_eig_max": float(eig.max())}
    if u_star is not None:
        target = u_star(x)
        error = torch.linalg.norm(U - target, dim=(-2, -1)) / torch.linalg.norm(
            target, dim=(-2, -1)
        )
        row["reward/u_star_error"] = float(error.mean())
    return row


def matrix_entries(reward: nn.Module) -> dict[str, float]:
    """u_ij (i <= j) of a constant reward matrix, for plots of U over outer steps; {} for U(x)."""
    if isinstance(reward, InputDependentMahalanobis):
        return {}
    U = reward.matrix().detach()
    rows, cols = torch.triu_indices(U.shape[0], U.shape[0])
    return {f"u_{i}{j}": float(U[i, j]) for i, j in zip(rows.tolist(), cols.tolist(), strict=True)}


def outer_row(
    predictor: nn.Module,
    reward: nn.Module,
    train: Dataset,
    val: Dataset | None,
    u_star: UStar | None,
) -> dict[str, float]:
    """outer/train_nll, outer/val_nll, val/* metrics and the reward diagnostics (on val x)."""
    row = {"outer/train_nll": evaluate(predictor, train)["nll"]}
    if val is not None:
        metrics = evaluate(predictor, val)
        row |= {"outer/val_nll": metrics["nll"]} | {f"val/{k}": v for k, v in metrics.items()}
    return row | reward_diagnostics(reward, (val if val is not None else train).x, u_star)


def log_row(writer, row: dict[str, float], monitor, predictor, reward) -> dict[str, float]:
    """Add the monitor's metrics and U's entries to `row`, write its `group/key` scalars at
    row["step"] to TensorBoard, and return it."""
    if monitor is not None:
        row |= monitor(predictor)
    row |= matrix_entries(reward)
    if writer is not None:
        for key, value in row.items():
            if "/" in key:
                writer.add_scalar(key, value, int(row["step"]))
    return row


def final_metrics(history: list[dict[str, float]]) -> dict[str, float]:
    """The learner's return value: the last row's outer/, val/, solver/ and reward/ scalars."""
    prefixes = ("outer/", "val/", "solver/", "reward/")
    return {k: v for k, v in history[-1].items() if k.startswith(prefixes)}
