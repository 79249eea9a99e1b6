"""A batched ensemble of Gaussian MLPs (PETS-style) and the learner that trains it with any loss.

Every member is a 4 × 200 SiLU MLP; their weights are stacked as [E, in, out] so one batched
matmul (torch.baddbmm) runs all members. Inputs and targets are normalised with statistics that
change only through `fit_normaliser` (forward passes stay pure, so torch.func works on them).

Two coordinate systems:
- `ensemble(x)` returns the distribution of raw targets (Δ-states for dynamics models);
- `NormalisedTargets(ensemble)(x)` returns the distribution of (y - target_mean) / target_std.
  Losses train in this space, so MSE weights every output dimension equally and a reward matrix
  U is expressed relative to the normalised residual covariance: PG under a constant U learns
  the normalised covariance (λ/2)U⁻¹, i.e. diag(s) (λ/2)U⁻¹ diag(s) in raw units.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal
from torch.nn import functional as F

from mbrl_bilevel.data import Dataset
from mbrl_bilevel.models import soft_bound
from mbrl_bilevel.training import FitConfig, Loss, evaluate, fit, log_scalars
from mbrl_bilevel.validation import ConfigError


class GaussianEnsemble(nn.Module):
    """E diagonal Gaussians p_e(y|x) = N(μ_e(x), diag σ_e(x)²) with softly bounded log-variance.

    forward(x [B, in] or [E, B, in]) -> Independent(Normal) with batch [E, B] and event D.
    `elite_mask` [E] marks the members `mixture` uses (all of them until `select_elites`).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        members: int = 7,
        elites: int = 5,
        hidden: Sequence[int] = (200, 200, 200, 200),
        min_log_var: float = -10.0,
        max_log_var: float = 0.5,
    ):
        super().__init__()
        if members < 1 or not 1 <= elites <= members:
            raise ConfigError(
                f"need members >= 1 and 1 <= elites <= members, got {members}, {elites}"
            )
        self.in_dim, self.out_dim, self.members, self.elites = in_dim, out_dim, members, elites
        dims = [in_dim, *hidden, 2 * out_dim]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(dims[:-1], dims[1:], strict=True):
            weight = torch.empty(members, fan_in, fan_out)
            nn.init.trunc_normal_(weight, std=1 / (2 * math.sqrt(fan_in)))
            self.weights.append(nn.Parameter(weight))
            self.biases.append(nn.Parameter(torch.zeros(members, 1, fan_out)))
        self.min_log_var = nn.Parameter(torch.full((out_dim,), float(min_log_var)))
        self.initial_min_log_var = float(min_log_var)
        self.max_log_var = nn.Parameter(torch.full((out_dim,), float(max_log_var)))
        self.register_buffer("input_mean", torch.zeros(in_dim))
        self.register_buffer("input_std", torch.ones(in_dim))
        self.register_buffer("target_mean", torch.zeros(out_dim))
        self.register_buffer("target_std", torch.ones(out_dim))
        self.register_buffer("elite_mask", torch.ones(members, dtype=torch.bool))

    def fit_normaliser(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Set input and target statistics from x [N, in], y [N, D] (constant columns get std 1)."""
        for name, data in (("input", x), ("target", y)):
            std = data.std(0)
            getattr(self, f"{name}_mean").copy_(data.mean(0))
            getattr(self, f"{name}_std").copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def normalised_head(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance [E, B, D] of the normalised targets for x [B, in] or [E, B, in]."""
        output = torch.baddbmm(self.biases[-1], self.trunk(x), self.weights[-1])
        mean, raw = output.chunk(2, dim=-1)
        return mean, soft_bound(raw, self.min_log_var, self.max_log_var)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden layer [E, B, H] for x [B, in] or [E, B, in]: the features the output
        layer's mean half and log-variance half share."""
        h = (x - self.input_mean) / self.input_std
        if h.ndim == 2:
            h = h.expand(self.members, *h.shape)
        return F.silu(stacked_mlp(h, self.weights[:-1], self.biases[:-1]))

    def log_variance_head(self, features: torch.Tensor) -> torch.Tensor:
        """Normalised log-variance [E, B, D] from trunk features [E, B, H]: the output layer's
        log-variance half, softly bounded."""
        half = self.out_dim
        raw = torch.baddbmm(self.biases[-1][..., half:], features, self.weights[-1][..., half:])
        return soft_bound(raw, self.min_log_var, self.max_log_var)

    def forward(self, x: torch.Tensor) -> Independent:
        mean, log_var = self.normalised_head(x)
        return _diag_normal(
            mean * self.target_std + self.target_mean, (0.5 * log_var).exp() * self.target_std
        )

    def frozen_members(
        self, members: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> FrozenMembers:
        """A detached copy of the members `members` [E'] (indices) for fast inference, with the
        weights in `dtype`; see FrozenMembers."""
        return FrozenMembers(self, members, dtype)

    def log_var_penalty(self) -> torch.Tensor:
        """PETS' penalty on the learnable bounds: Σ max_log_var - Σ min_log_var."""
        return self.max_log_var.sum() - self.min_log_var.sum()

    def mixture(self, x: torch.Tensor) -> MixtureSameFamily:
        """The elites as a uniform mixture: batch [B], event D (raw target units)."""
        dist = self(x).base_dist
        mask = self.elite_mask
        loc, scale = dist.loc[mask].transpose(0, 1), dist.scale[mask].transpose(0, 1)
        weights = Categorical(logits=loc.new_zeros(loc.shape[:2]), validate_args=False)
        return MixtureSameFamily(weights, _diag_normal(loc, scale), validate_args=False)

    @torch.no_grad()
    def select_elites(self, data: Dataset, metric: str = "nll") -> torch.Tensor:
        """Keep the `elites` members with the lowest held-out `metric` (nll or rmse, in normalised
        target units); returns every member's score [E]."""
        dist = NormalisedTargets(self)(data.x)
        y = (data.y - self.target_mean) / self.target_std
        if metric == "nll":
            score = -dist.log_prob(y).mean(-1)
        elif metric == "rmse":
            score = (dist.mean - y).pow(2).mean((-2, -1)).sqrt()
        else:
            raise ConfigError(f"elites are chosen on nll or rmse, got {metric!r}")
        self.elite_mask.zero_()
        self.elite_mask[score.argsort()[: self.elites]] = True
        return score


class NormalisedTargets(nn.Module):
    """The ensemble in normalised target coordinates: forward(x) -> the distribution of
    (y - target_mean) / target_std, batch [E, B], event D. Shares the ensemble's parameters."""

    def __init__(self, ensemble: GaussianEnsemble):
        super().__init__()
        self.ensemble = ensemble

    def forward(self, x: torch.Tensor) -> Independent:
        mean, log_var = self.ensemble.normalised_head(x)
        return _diag_normal(mean, (0.5 * log_var).exp())

    def min_variance(self) -> float:
        """The smallest variance the members are built to reach: exp of the initial lower
        log-variance bound (the learned bound drifts with its penalty and the data)."""
        return math.exp(self.ensemble.initial_min_log_var)

    def output_layer_names(self) -> list[str]:
        """Names (in this module) of the last layer's weight [E, h, 2D] and bias [E, 1, 2D]."""
        last = len(self.ensemble.weights) - 1
        return [f"ensemble.weights.{last}", f"ensemble.biases.{last}"]

    def normalise(self, data: Dataset) -> Dataset:
        ensemble = self.ensemble
        return Dataset(data.x, (data.y - ensemble.target_mean) / ensemble.target_std)


class FrozenMembers:
    """Some members of a GaussianEnsemble, detached, for planning: (x [E', B, in]) -> raw-unit
    mean and std [E', B, D] of those members, equal to the ensemble's own up to rounding.

    The weights are copied at construction (later training does not reach them), with the input
    and target normalisers folded into the first and last layers, and cast to `dtype`: the
    layers run in `dtype`, inputs and outputs are float32.
    """

    def __init__(self, ensemble: GaussianEnsemble, members: torch.Tensor, dtype: torch.dtype):
        with torch.no_grad():
            weights = [w[members] for w in ensemble.weights]
            biases = [b[members] for b in ensemble.biases]
            # first layer: ((x - m) / s) W + b = x (W / s) + (b - (m / s) W)
            scaled = ensemble.input_mean / ensemble.input_std
            biases[0] = biases[0] - (scaled @ weights[0])[:, None]
            weights[0] = weights[0] / ensemble.input_std[:, None]
            # last layer, mean columns: (h W + b) t_std + t_mean
            scale = torch.cat([ensemble.target_std, torch.ones_like(ensemble.target_std)])
            shift = torch.cat([ensemble.target_mean, torch.zeros_like(ensemble.target_mean)])
            weights[-1], biases[-1] = weights[-1] * scale, biases[-1] * scale + shift
            self.weights = [w.to(dtype) for w in weights]
            self.biases = [b.to(dtype) for b in biases]
            # std = t_std · exp(½ soft_bound(raw)) with one exp per element (see __call__)
            low, high = ensemble.min_log_var, ensemble.max_log_var
            self.high, self.span = high.clone(), (high - low).exp()
            self.min_std = ensemble.target_std * (0.5 * low).exp()
        self.dtype = dtype
        self.buffers = [torch.empty(0, dtype=dtype) for _ in weights[:-1]]

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = stacked_mlp(x.to(self.dtype), self.weights, self.biases, self.buffers)
        mean, raw = h.float().chunk(2, dim=-1)
        # soft_bound(raw) = low + log(1 + c / (1 + a)) with a = exp(high - raw), c = exp(high -
        # low): the two softplus folded into one exp, a tenth of a planning step saved
        a = torch.sub(self.high, raw).exp_().add_(1)
        return mean, torch.div(self.span, a).add_(1).sqrt_().mul_(self.min_std)


def stacked_mlp(
    h: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    buffers: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The members' SiLU MLPs at once: h [E, B, in] -> [E, B, out] with weights [E, in, out] and
    biases [E, 1, out] per layer. With `buffers` (one flat tensor per hidden layer, grown when
    too small) the hidden activations are computed in place in them, with no gradient and no
    large allocation (whose page faults cost as much as a fifth of the matmul time)."""
    last = len(weights) - 1
    for index, (weight, bias) in enumerate(zip(weights, biases, strict=True)):
        if buffers is None or index == last:
            h = torch.baddbmm(bias, h, weight)
        else:
            shape = (*h.shape[:-1], weight.shape[-1])
            if buffers[index].numel() < math.prod(shape):
                buffers[index] = h.new_empty(math.prod(shape))
            h = torch.baddbmm(bias, h, weight, out=buffers[index][: math.prod(shape)].view(shape))
        if index < last:
            h = F.silu(h, inplace=buffers is not None)
    return h


def _diag_normal(loc: torch.Tensor, scale: torch.Tensor) -> Independent:
    return Independent(Normal(loc, scale, validate_args=False), 1, validate_args=False)


def bootstrap_batches(
    data: Dataset, members: int, batch_size: int | None, generator: torch.Generator
) -> Iterator[Dataset]:
    """Endless minibatches x [E, B, in], y [E, B, D]: member e draws from its own bootstrap
    sample (N rows with replacement, drawn once), reshuffled every epoch."""
    n = len(data)
    sample = torch.randint(n, (members, n), generator=generator)
    size = n if batch_size is None else min(batch_size, n)
    while True:
        order = torch.argsort(torch.rand(members, n, generator=generator), dim=1)
        shuffled = sample.gather(1, order)
        for start in range(0, n - size + 1, size):
            index = shuffled[:, start : start + size]
            yield Dataset(data.x[index], data.y[index])


LOG_VAR_PENALTY = 0.01
"""Default weight of the log-variance bound penalty (PETS')."""


class LogVarPenalty:
    """Wrap a loss: add weight · (Σ max_log_var - Σ min_log_var) of the ensemble behind `predictor`."""

    def __init__(self, loss: Loss, weight: float):
        self.loss, self.weight = loss, weight

    def __call__(self, predictor: NormalisedTargets, x: torch.Tensor, y: torch.Tensor):
        value, metrics = self.loss(predictor, x, y)
        penalty = predictor.ensemble.log_var_penalty()
        return value + self.weight * penalty, metrics | {"log_var_bounds": penalty.item()}


class EnsembleLearner:
    """Train a GaussianEnsemble with any loss: normaliser fitted on `train`, the loss evaluated in
    normalised target units, a bootstrap sample per member, the log-variance bound penalty,
    holdout early stopping on `val` (config.patience, config.select_on), then elites chosen on
    `val`. Consecutive calls log on one continuing step axis.

    `update` (solvers.updates: FixedReward, PluginRefresh, ImplicitRefresh) adapts the reward of
    a PG loss: `update.start(view, train, val)` with normalised data at the start of each fit,
    `update(step, view)` after every step; its latest scalars (`update.last`: reward/,
    solver/) join fit's return value. `finish(ensemble, train, generator) -> metrics`
    (variance_head.VarianceHeadFit), if given, runs after the fit and before the elites are
    chosen, on the normalised training split (its scalars, and finish/val_nll and
    finish/val_rmse of the model it delivers, go to TensorBoard at the fit's last step and into
    the returned metrics); the fit then validates with
    `finish.validate(view, val=...) -> {"val/<finish.select_on>": ...}` and keeps the weights
    best on that metric (the model as the finish step will deliver it), while the elites are
    still chosen on config.select_on.
    """

    def __init__(
        self,
        loss: Loss,
        config: FitConfig,
        penalty: float = LOG_VAR_PENALTY,
        bootstrap: bool = True,
        seed: int = 0,
        writer=None,
        progress: bool | None = None,
        description: str = "ensemble",
        update=None,
        finish=None,
    ):
        self.loss = LogVarPenalty(loss, penalty) if penalty > 0 else loss
        self.update, self.finish = update, finish
        self.config, self.bootstrap, self.seed = config, bootstrap, seed
        self.writer, self.progress, self.description = writer, progress, description
        self.global_step = 0

    def fit(
        self, ensemble: GaussianEnsemble, train: Dataset, val: Dataset | None
    ) -> dict[str, float]:
        if len(train) == 0:
            raise ConfigError("the training split is empty")
        ensemble.fit_normaliser(train.x, train.y)
        view = NormalisedTargets(ensemble)
        train_n, val_n = view.normalise(train), val if val is None else view.normalise(val)
        if self.update is not None:
            self.update.start(view, train_n, val_n)
        generator = torch.Generator().manual_seed(self.seed)
        batches = None
        if self.bootstrap:
            batches = bootstrap_batches(
                train_n, ensemble.members, self.config.batch_size, generator
            )
        config, monitor = self.config, None
        if self.finish is not None and val_n is not None:
            config = dataclasses.replace(config, select_on=self.finish.select_on)
            monitor = functools.partial(self.finish.validate, val=val_n)
        result = fit(
            view,
            self.loss,
            train_n,
            val_n,
            config,
            monitor=monitor,
            batches=batches,
            writer=self.writer,
            step_offset=self.global_step,
            generator=generator,
            progress=self.progress,
            description=self.description,
            on_step=self.update,
        )
        self.global_step += self.config.steps
        if self.finish is not None:
            delivered = self.finish(ensemble, train_n, generator)
            if val_n is not None:  # the fit's val/* describe the model before the finish
                delivered |= {f"finish/val_{k}": v for k, v in evaluate(view, val_n).items()}
            log_scalars(self.writer, delivered, self.global_step)
            result.metrics |= delivered
        if val is not None:
            scores = ensemble.select_elites(val, self.config.select_on)
            result.metrics["val/elite_score"] = float(scores[ensemble.elite_mask].mean())
        reward = self.update.last if self.update is not None else {}
        return result.metrics | reward | {"best_step": float(result.best_step)}

    def state_dict(self) -> dict:
        """What a resumed agent needs: the step axis and the reward update's state."""
        update = self.update.state_dict() if self.update is not None else None
        return {"global_step": self.global_step, "update": update}

    def load_state_dict(self, state: dict) -> None:
        self.global_step = state["global_step"]
        if self.update is not None:
            self.update.load_state_dict(state["update"])
