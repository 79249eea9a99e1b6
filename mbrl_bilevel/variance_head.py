"""The variance phase of β-weighted PG (`pg-plugin-input-beta`): after the fit, with the trunk and
the means frozen, each member's log-variance head (the output layer's second half and the soft
log-variance bounds) maximises the variance's part of PG's J under the plug-in reward U(x):

    min_s  E_x Σ_d [u_d(x) s_d²(x) - (λ/2) log s_d²(x)] + penalty · (Σ max_log_var - Σ min_log_var),

which is -J's dependence on the variance for a Gaussian under r = -(ŷ - y)ᵀU(x)(ŷ - y), in
closed form (no samples, no targets), with the same optimum s²(x) = (λ/2)/u(x) (SPEC 2).

Why: during the fit, the β weights w = σ̂²(x)^β multiply the variance's part of J too, so at
low-noise inputs the variances hardly learn and stay far above σ̂²(x); unweighting that part
during the fit lets the variance gradient reshape the shared trunk and costs the mean's RMSE.
Fitting the head alone afterwards keeps the means and gives the variances the plug-in's shape
(docs/results/dynamics.md, "The variance phase").
"""

from __future__ import annotations

import torch
from torch.distributions import Normal

from mbrl_bilevel.data import Dataset
from mbrl_bilevel.ensemble import LOG_VAR_PENALTY, GaussianEnsemble, NormalisedTargets
from mbrl_bilevel.mean_head import refit_mean_head
from mbrl_bilevel.solvers.updates import InputPluginRefresh
from mbrl_bilevel.validation import ConfigError


class VarianceHeadFit:
    """Called as (ensemble, train, generator): with `mean_phase`, first the mean phase
    (mean_head.refit_mean_head: the mean heads refitted by least squares), then refresh the
    plug-in at the ensemble's weights, then `steps` Adam steps (lr, minibatches of `batch_size` training inputs shared by
    the members) on the objective above; returns its last value as
    {"variance_head/objective": float} (and the mean phase's mean_head/ scalars). `train` is in normalised target units (only its inputs
    are used). The frozen trunk's features and U(x) are computed once for each input the
    minibatches draw: N' = min(N, steps · batch_size) rows, E · N' · H floats (200 MB for
    E = 7, N' = 35k, H = 200)."""

    select_on = "plugin_nll"
    """The fit's validation metric for early stopping and the best weights (see validate)."""

    def __init__(
        self,
        update: InputPluginRefresh,
        lam: float,
        steps: int = 3000,
        batch_size: int = 256,
        lr: float = 1e-3,
        penalty: float = LOG_VAR_PENALTY,
        mean_phase: bool = True,
    ):
        if steps <= 0 or batch_size <= 0:
            raise ConfigError(f"steps and batch_size must be > 0, got {steps}, {batch_size}")
        self.update, self.lam, self.steps = update, lam, steps
        self.batch_size, self.lr, self.penalty = batch_size, lr, penalty
        self.mean_phase = mean_phase

    @torch.no_grad()
    def validate(self, view: NormalisedTargets, val: Dataset) -> dict[str, float]:
        """{"val/plugin_nll": float}: the members' NLL per sample on `val` (normalised targets)
        with their own means and the plug-in's variances (λ/2)/u(x), which the phase will copy:
        the fit is judged on the model it will deliver, not on the variances the phase replaces
        (judged on those, β = 0.75 stopped at ~2800 of 4000 steps on Hopper medium with the
        validation RMSE still falling). σ̂²(x) is regressed on this split's residuals, so the
        value is slightly optimistic; it only compares the fit's steps with one another."""
        mean = view(val.x).mean
        variance = (0.5 * self.lam) / self.update.reward.log_diagonal_at(val.x).exp()
        log_prob = Normal(mean, variance.sqrt(), validate_args=False).log_prob(val.y)
        return {f"val/{self.select_on}": float(-log_prob.sum(-1).mean())}

    def __call__(
        self, ensemble: GaussianEnsemble, train: Dataset, generator: torch.Generator
    ) -> dict[str, float]:
        metrics = refit_mean_head(ensemble, train) if self.mean_phase else {}
        self.update.refresh(NormalisedTargets(ensemble))
        reward = self.update.reward
        head = [ensemble.weights[-1], ensemble.biases[-1]]
        bounds = [ensemble.min_log_var, ensemble.max_log_var]
        optimizer = torch.optim.Adam(head + bounds, lr=self.lr)  # the mean half gets no gradient
        batches = torch.randint(
            len(train), (self.steps, min(self.batch_size, len(train))), generator=generator
        )
        drawn, batches = batches.unique(return_inverse=True)
        with torch.no_grad():  # frozen: once per drawn input, [E, N', H] and [N', D]
            all_features = ensemble.trunk(train.x[drawn])
            all_u = reward.log_diagonal_at(train.x[drawn]).exp()
        for rows in batches:
            features, u = all_features[:, rows], all_u[rows]
            log_var = ensemble.log_variance_head(features)
            objective = (u * log_var.exp() - 0.5 * self.lam * log_var).sum(-1).mean()
            loss = objective + self.penalty * ensemble.log_var_penalty()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return metrics | {"variance_head/objective": objective.item()}
