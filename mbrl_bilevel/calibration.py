"""Post-hoc variance calibration of Gaussian predictive distributions: one factor c_d per output
dimension multiplies every variance of that dimension, fitted by maximum likelihood on held-out
data (σ scaling; Kuleshov et al. 2018, Levi et al. 2019). The means, hence the RMSE, are
unchanged. For a single diagonal Gaussian the optimum is closed form, c_d = mean_i(r_id² / σ_id²)
with r the residuals; for a mixture (an ensemble's elites) it is found by L-BFGS on log c.
"""

from __future__ import annotations

import torch
from torch.distributions import Distribution, Independent, MixtureSameFamily, Normal

from mbrl_bilevel.validation import ConfigError


def _scaled_normal(dist: Distribution, std_factor: torch.Tensor) -> Independent:
    if not (isinstance(dist, Independent) and isinstance(dist.base_dist, Normal)):
        raise ConfigError(
            f"variance calibration needs diagonal Gaussians, got {type(dist).__name__}"
        )
    base = dist.base_dist
    return Independent(Normal(base.loc, base.scale * std_factor, validate_args=False), 1)


def scale_variance(dist: Distribution, factor: torch.Tensor) -> Distribution:
    """`dist` (a diagonal Gaussian with event D, or a MixtureSameFamily of them) with each
    variance of output dimension d multiplied by factor[d] (factor [D], positive)."""
    std_factor = factor.sqrt()
    if isinstance(dist, MixtureSameFamily):
        components = _scaled_normal(dist.component_distribution, std_factor)
        return MixtureSameFamily(dist.mixture_distribution, components, validate_args=False)
    return _scaled_normal(dist, std_factor)


def fit_variance_scale(dist: Distribution, y: torch.Tensor, max_iter: int = 100) -> torch.Tensor:
    """The factors c [D] maximising the mean log-likelihood of held-out targets y [B, D] under
    scale_variance(dist, c), with dist's batch [B] and event D; starts from c = 1."""
    log_factor = torch.zeros(y.shape[1], dtype=y.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_factor], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = -scale_variance(dist, log_factor.exp()).log_prob(y).mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    factor = log_factor.detach().exp()
    if not torch.isfinite(factor).all():
        raise ConfigError("variance calibration diverged: the held-out NLL is not finite")
    return factor
