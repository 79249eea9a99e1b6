"""Reward updates that run inside a minibatch fit (`training.fit(on_step=...)`), so an ensemble
keeps its bootstrap batches, log-variance penalty, normalised targets and early stopping while
PG trains it under a reward that changes:

- FixedReward: U chosen once per fit from the training split (pg-identity, pg-scaled, ...).
- PluginRefresh: U = (λ/2)Σ̂⁻¹ (diag, full or scalar) from the held-out residuals, every K steps.
- InputPluginRefresh: U(x) = (λ/2)diag(σ̂²(x))⁻¹, σ̂²(x) regressed on the held-out squared
  residuals every K steps (the heteroscedastic plug-in).
- ImplicitRefresh: φ moved by the IFT hypergradient of the held-out NLL every K steps, from
  minibatches of the train split (the Gauss–Newton curvature of the output layer) and the
  held-out split (∇_θ F), where the inner problem is near its optimum.

An update is used as `update.start(predictor, train, val)` at the start of each fit (data in the
loss's coordinates), then `update(step, predictor) -> scalars` after every optimiser step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from mbrl_bilevel.data import Dataset
from mbrl_bilevel.rewards import (
    DiagonalInputMahalanobis,
    DiagonalMahalanobis,
    FixedMahalanobis,
    InputDependentMahalanobis,
)
from mbrl_bilevel.solvers.hypergrad import BilevelProblem
from mbrl_bilevel.solvers.inner import reward_diagnostics
from mbrl_bilevel.solvers.linear import LinearSolverConfig
from mbrl_bilevel.solvers.objectives import Objective
from mbrl_bilevel.solvers.output_layer import SKIP_REASONS, output_layer_outer_step
from mbrl_bilevel.solvers.plugin import (
    floor_variances,
    plugin_ceiling,
    plugin_matrix,
    residual_covariance,
    shrink,
)
from mbrl_bilevel.validation import ConfigError, check_positive

log = logging.getLogger(__name__)


class RewardUpdate(Protocol):
    last: dict[str, float]
    """The scalars of the latest reward update (reward/, solver/), for a learner's return value."""

    def start(self, predictor: nn.Module, train: Dataset, val: Dataset | None) -> None: ...

    def __call__(self, step: int, predictor: nn.Module) -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class _RewardState:
    """state_dict / load_state_dict of an update whose only state is its reward module."""

    reward: nn.Module

    def state_dict(self) -> dict:
        return {"reward": self.reward.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.reward.load_state_dict(state["reward"])


def _require_val(val: Dataset | None, who: str) -> Dataset:
    if val is None or len(val) == 0:
        raise ConfigError(f"{who} needs a non-empty held-out split")
    return val


class FixedReward(_RewardState):
    """U [D, D] = choose(train) at the start of every fit; nothing changes during the fit."""

    def __init__(self, reward: FixedMahalanobis, choose: Callable[[Dataset], torch.Tensor]):
        self.reward, self.choose = reward, choose
        self.last: dict[str, float] = {}

    def start(self, predictor: nn.Module, train: Dataset, val: Dataset | None) -> None:
        self.reward.U.copy_(self.choose(train).to(self.reward.U))

    def __call__(self, step: int, predictor: nn.Module) -> dict[str, float]:
        return {}


class PluginRefresh(_RewardState):
    """The plug-in reward U = plugin_matrix(kind, Σ̂, λ), Σ̂ the covariance of the held-out
    residuals y - μ_θ(x) (ensemble members pooled; `floor_variances`, then `shrink`),
    re-estimated at the start of each fit and every `every` steps. For a diagonal Gaussian model
    `diag` is the right kind: PG then learns each dimension's residual variance (SPEC
    section 2)."""

    def __init__(
        self,
        reward: FixedMahalanobis,
        lam: float,
        kind: str = "diag",
        every: int = 50,
        max_condition: float = 1e6,
    ):
        if kind not in ("full", "diag", "scalar"):
            raise ConfigError(f"plug-in kind must be full, diag or scalar, got {kind!r}")
        if every <= 0:
            raise ConfigError(f"the plug-in refresh interval must be > 0, got {every}")
        self.reward, self.lam, self.kind = reward, check_positive(lam, "λ"), kind
        self.every, self.max_condition = every, max_condition
        self.val: Dataset | None = None
        self.last: dict[str, float] = {}

    def start(self, predictor: nn.Module, train: Dataset, val: Dataset | None) -> None:
        self.val = _require_val(val, "the plug-in reward")
        self._refresh(predictor)

    def _refresh(self, predictor: nn.Module) -> None:
        sigma = floor_variances(residual_covariance(predictor, self.val), predictor)
        sigma = shrink(sigma, self.max_condition)
        self.reward.U.copy_(plugin_matrix(self.kind, sigma, self.lam))

    def __call__(self, step: int, predictor: nn.Module) -> dict[str, float]:
        if step % self.every:
            return {}
        self._refresh(predictor)
        self.last = reward_diagnostics(self.reward, self.val.x[:1])
        return self.last


class InputPluginRefresh:
    """The heteroscedastic plug-in reward U(x) = (λ/2)diag(σ̂²(x))⁻¹: σ̂²(x) is a regression of the
    held-out squared residuals r² = (y - μ_θ(x))² (ensemble members averaged) on x, refitted at
    the start of each fit and every `every` steps. A refit is `fit_steps` full-batch AdamW steps
    (weight decay `weight_decay`) on the Gaussian NLL of the residuals, log σ̂²(x) + r²/σ̂²(x),
    warm-started from the last refit, with each dimension's constant level set in closed form
    before and after (so the average level is always the plug-in's and Adam moves only the
    shape). PG under U(x) learns S(x) = σ̂²(x) (SPEC 2) and a mean weighted by U(x), as NLL
    weights it. The regression sees only the held-out split; keep its MLP small."""

    def __init__(
        self,
        reward: DiagonalInputMahalanobis,
        lam: float,
        every: int = 50,
        fit_steps: int = 20,
        lr: float = 0.01,
        weight_decay: float = 1e-3,
    ):
        if every <= 0 or fit_steps <= 0:
            raise ConfigError(f"every and fit_steps must be > 0, got {every}, {fit_steps}")
        self.reward, self.lam, self.every, self.fit_steps = (
            reward,
            check_positive(lam, "λ"),
            every,
            fit_steps,
        )
        self.optimizer = torch.optim.AdamW(
            reward.parameters(), lr=check_positive(lr, "lr"), weight_decay=weight_decay
        )
        self.val: Dataset | None = None
        self.refreshes = 0
        self.last: dict[str, float] = {}

    def start(self, predictor: nn.Module, train: Dataset, val: Dataset | None) -> None:
        self.val = _require_val(val, "the heteroscedastic plug-in reward")
        if self.refreshes == 0:
            self.reward.fit_normaliser(train.x)
        self.refresh(predictor)

    def _level(self, squared: torch.Tensor) -> torch.Tensor:
        """Add to each dimension's log U the constant that minimises the residual NLL; returns
        that NLL, mean over rows and dims of log σ̂² + r²/σ̂² with σ̂² = (λ/2)/U."""
        with torch.no_grad():
            log_u = self.reward.log_diagonal_at(self.val.x)
            scale = (squared * log_u.exp()).mean(0).clamp_min(1e-12)
            self.reward.net[-1].bias.add_((0.5 * self.lam / scale).log())
            return self._residual_nll(squared)

    def _residual_nll(self, squared: torch.Tensor) -> torch.Tensor:
        log_u = self.reward.log_diagonal_at(self.val.x)
        return (2 / self.lam * squared * log_u.exp() - log_u).mean() + math.log(0.5 * self.lam)

    def refresh(self, predictor: nn.Module) -> None:
        """Refit σ̂²(x) to the held-out residuals of `predictor` now."""
        with torch.no_grad():
            mean = predictor(self.val.x).mean
            squared = (self.val.y - mean).pow(2).reshape(-1, *self.val.y.shape).mean(0)
        self._level(squared)
        for _ in range(self.fit_steps):
            loss = self._residual_nll(squared)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        nll = self._level(squared)
        self.refreshes += 1
        self.last = reward_diagnostics(self.reward, self.val.x) | {
            "reward/residual_nll": nll.item()
        }

    def __call__(self, step: int, predictor: nn.Module) -> dict[str, float]:
        if step % self.every:
            return {}
        self.refresh(predictor)
        return self.last

    def state_dict(self) -> dict:
        return {
            "reward": self.reward.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "refreshes": self.refreshes,
        }

    def load_state_dict(self, state: dict) -> None:
        self.reward.load_state_dict(state["reward"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.refreshes = state["refreshes"]


class ImplicitRefresh:
    """Learn the reward's φ during the fit: every `every` steps one implicit outer step on
    `batch_size` random rows of each split (output_layer.output_layer_outer_step): θ in the IFT is
    the predictor's output layer (`predictor.output_layer_names()`, the trunk's features held
    fixed), its curvature the Gauss–Newton matrix of -J (positive definite with the damping, so
    the solve cannot meet negative curvature), solved block by block by preconditioned CG with
    `linear`'s damping (relative), tol and max_iter (materialised and solved by Cholesky for a
    predictor without an ensemble's stacked output layer, e.g. the paper protocol's GaussianMLP);
    the mixed term is exact. The outer Adam
    persists across fits (an agent retraining its model keeps learning the same reward).

    A step is skipped, φ and Adam's moments untouched, when the inner problem is not near its
    optimum for the current U (|outer gap| > `stationarity` nat/dim: the held-out NLL would move
    that much to first order if θ moved to the hyper-batch's Gauss–Newton point) or when the
    solve's relative residual exceeds `max_residual`. Skips are logged at DEBUG (never printed
    by default) and counted: each outer step returns the fit's counts with its own scalars
    (solver/, outer/, reward/), which go to TensorBoard and, as `last`, into the fit's metrics.

    With `plugin_start`, the reward follows the diagonal plug-in P = (λ/2)diag(Σ̂)⁻¹ of the
    held-out residuals, floored by `floor_variances` (the closed-form optimum for a homoscedastic
    model), and the hypergradient learns a correction relative to it: the first outer step ever
    sets U (constant in x) to P, every later one first moves U by P's change since the previous
    step (U <- S U S, S² = P_new / P_old, `reward.rescale`). Without this, an agent's reward
    stays near the plug-in of its first, tiny dataset: Adam moves log U by about `outer_lr` per
    outer step, far too slowly to follow residuals that shrink by orders of magnitude as data
    arrives. A constant diagonal U is then kept within a factor `max_correction` of P and below
    the plug-in of the variance floor (`plugin_ceiling`) after every outer step: Adam's
    normalised steps turn a small, consistently signed hypergradient into a drift of `outer_lr`
    per step, and an agent takes hundreds of outer steps (on Reacher U grew 200× past the ceiling,
    where PG's optimal variance lies below the model's bound and the IFT solves fail).
    Input-dependent rewards keep only their own soft bounds on log U(x). Every step reports
    reward/log_u_over_plugin (mean over held-out rows and dimensions of log U_d(x) - log P_d) and
    reward/log_u_over_plugin_max (its largest absolute value)."""

    def __init__(
        self,
        reward: nn.Module,
        objective: Objective,
        every: int = 50,
        batch_size: int = 1024,
        outer_lr: float = 0.05,
        linear: LinearSolverConfig | None = None,
        seed: int = 0,
        plugin_start: bool = True,
        max_correction: float = 10.0,
        stationarity: float = 0.1,
        max_residual: float = 1e-2,
        inner_steps: int = 0,
    ):
        if every <= 0 or batch_size <= 0:
            raise ConfigError(f"every and batch_size must be > 0, got {every}, {batch_size}")
        if not max_correction > 1:
            raise ConfigError(f"max_correction must be > 1, got {max_correction}")
        self.log_max_correction = math.log(max_correction)
        self.reward, self.objective, self.every, self.batch_size = (
            reward,
            objective,
            every,
            batch_size,
        )
        self.linear = linear or LinearSolverConfig(
            damping=1e-3, max_iter=50, tol=1e-4, warn=False, curvature="gauss-newton"
        )
        self.stationarity = check_positive(stationarity, "stationarity")
        self.max_residual = check_positive(max_residual, "max_residual")
        self.optimizer = torch.optim.Adam(reward.parameters(), lr=check_positive(outer_lr, "lr"))
        self.generator = torch.Generator().manual_seed(seed)
        self.plugin_start, self.inner_steps = plugin_start, inner_steps
        self.last: dict[str, float] = {}
        self.outer_step = 0
        self.counts = dict.fromkeys(("steps", *SKIP_REASONS), 0)
        """Outer steps in the current fit, and those skipped for each reason."""
        self.anchor: torch.Tensor | None = None
        """log diag of the plug-in U at the previous outer step [D]."""
        self.train: Dataset | None = None
        self.val: Dataset | None = None

    def start(self, predictor: nn.Module, train: Dataset, val: Dataset | None) -> None:
        self.train, self.val = train, _require_val(val, "the bilevel reward")
        self.counts = dict.fromkeys(self.counts, 0)
        if isinstance(self.reward, InputDependentMahalanobis) and self.outer_step == 0:
            self.reward.fit_normaliser(train.x)

    def _log_plugin(self, predictor: nn.Module) -> torch.Tensor:
        """log diag of the plug-in (λ/2)diag(Σ̂)⁻¹ of the held-out residuals, floored [D]."""
        sigma = floor_variances(residual_covariance(predictor, self.val), predictor)
        return plugin_matrix("diag", sigma, self.objective.lam).diagonal().log()

    def _anchor(self, log_plugin: torch.Tensor) -> None:
        """Set U to the plug-in exp(log_plugin) [D] (first time), or move it by the plug-in's
        change since the previous outer step."""
        if self.anchor is None:
            self.reward.set_constant(torch.diag(log_plugin.exp()))
        else:
            self.reward.rescale(log_plugin - self.anchor)
        self.anchor = log_plugin

    def _bound_correction(self, predictor: nn.Module) -> None:
        """Keep a constant diagonal U within a factor max_correction of the plug-in anchor and
        at most at the predictor's plug-in ceiling."""
        if not isinstance(self.reward, DiagonalMahalanobis):
            return
        log_ceiling = math.log(plugin_ceiling(predictor, self.objective.lam))
        upper = (self.anchor + self.log_max_correction).clamp_max(log_ceiling)
        lower = torch.minimum(self.anchor - self.log_max_correction, upper)
        self.reward.clamp_log(lower, upper)

    def _rows(self, data: Dataset) -> Dataset:
        index = torch.randperm(len(data), generator=self.generator)[: self.batch_size]
        return data.subset(index)

    @torch.no_grad()
    def _against_plugin(self, log_plugin: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
        """reward/log_u_over_plugin and reward/log_u_over_plugin_max at inputs x [B, in]."""
        ratio = self.reward.diagonal_at(x).log() - log_plugin
        return {
            "reward/log_u_over_plugin": float(ratio.mean()),
            "reward/log_u_over_plugin_max": float(ratio.abs().max()),
        }

    def _counted(self, reason: str | None) -> dict[str, float]:
        """Count this outer step (and its skip reason); the fit's counts and shares as scalars."""
        self.counts["steps"] += 1
        if reason is not None:
            self.counts[reason] += 1
            log.debug("outer step %d skipped: %s", self.outer_step, reason.replace("_", " "))
        row = {"solver/outer_steps": float(self.counts["steps"])}
        for name in SKIP_REASONS:
            row[f"solver/skipped_{name}"] = float(self.counts[name])
            row[f"solver/share_skipped_{name}"] = self.counts[name] / self.counts["steps"]
        return row

    def __call__(self, step: int, predictor: nn.Module) -> dict[str, float]:
        if step % self.every:
            return {}
        log_plugin = self._log_plugin(predictor)
        if self.plugin_start:
            self._anchor(log_plugin)
            self._bound_correction(predictor)
        self.outer_step += 1
        train, val = self._rows(self.train), self._rows(self.val)
        problem = BilevelProblem(
            predictor, self.reward, self.objective, train, val, predictor.output_layer_names()
        )
        row, reason = output_layer_outer_step(
            problem,
            self.optimizer,
            self.linear,
            self.stationarity,
            self.max_residual,
            self.outer_step,
            self.inner_steps,
            project=(lambda: self._bound_correction(predictor)) if self.plugin_start else None,
        )
        self.last = (
            row
            | self._counted(reason)
            | reward_diagnostics(self.reward, val.x)
            | self._against_plugin(log_plugin, val.x)
        )
        return self.last

    def state_dict(self) -> dict:
        return {
            "reward": self.reward.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "outer_step": self.outer_step,
            "anchor": self.anchor,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.reward.load_state_dict(state["reward"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.outer_step, self.anchor = state["outer_step"], state["anchor"]
        self.generator.set_state(state["generator"])
