"""The mean phase of β-weighted PG (`pg-plugin-input-beta`): after the fit, with the trunk frozen,
each member's mean head (the output layer's first half) is set to its least-squares fit on the
training split, in closed form:

    W_e, b_e = argmin_{W, b}  mean_n ‖y_n - W f_e(x_n) - b‖² + ridge · ‖W‖²_F,

f_e the member's trunk features. Under the PG reward this is the exact maximiser of J's mean part
with uniform weights (β = 1: every input and dimension weighs the same, SPEC 2), on the features
that the β-weighted fit learned. The fit's own weights σ̂²(x)^β (β = 0.5 by default) leave the
mean under-fitted where the reward is large; this readout is what the β = 1 weights would reach
for the last layer, without their cost to the variances (docs/results/dynamics.md, "The mean phase").
"""

from __future__ import annotations

import torch

from mbrl_bilevel.data import Dataset
from mbrl_bilevel.ensemble import GaussianEnsemble


@torch.no_grad()
def refit_mean_head(
    ensemble: GaussianEnsemble, train: Dataset, ridge: float = 1e-4, chunk: int = 4096
) -> dict[str, float]:
    """Set every member's mean head to the ridge least-squares fit above on `train` (x [N, in],
    y [N, D] in normalised target units), from normal equations accumulated in float64 over
    chunks of `chunk` rows (memory E · chunk · H, not E · N · H). Returns
    {"mean_head/train_rmse_before": float, "mean_head/train_rmse": float}."""
    members, hidden, out_dim = ensemble.members, ensemble.weights[-1].shape[1], train.y.shape[1]
    gram = torch.zeros(members, hidden + 1, hidden + 1, dtype=torch.float64)
    moment = torch.zeros(members, hidden + 1, out_dim, dtype=torch.float64)
    for start in range(0, len(train), chunk):
        features = ensemble.trunk(train.x[start : start + chunk]).double()  # [E, n, H]
        design = torch.cat([features, torch.ones_like(features[..., :1])], dim=-1)
        gram += design.transpose(1, 2) @ design
        moment += design.transpose(1, 2) @ train.y[start : start + chunk].double()
    penalty = torch.full((hidden + 1,), ridge * len(train), dtype=torch.float64)
    penalty[-1] = 0.0  # the bias is not shrunk
    solution = torch.linalg.solve(gram + torch.diag(penalty), moment)  # [E, H + 1, D]
    head = torch.cat([ensemble.weights[-1][..., :out_dim], ensemble.biases[-1][..., :out_dim]], 1)
    squares = train.y.double().pow(2).sum()

    def rmse(coefficients: torch.Tensor) -> float:
        """From the normal equations: Σ‖y - Aw‖² = Σ‖y‖² - 2 tr(wᵀAᵀy) + tr(wᵀAᵀAw)."""
        residual = squares - 2 * (coefficients * moment).sum((1, 2))
        residual = residual + (coefficients * (gram @ coefficients)).sum((1, 2))
        return float((residual.clamp_min(0).mean() / (len(train) * out_dim)).sqrt())

    before = rmse(head.double())
    ensemble.weights[-1][..., :out_dim] = solution[:, :-1].to(ensemble.weights[-1])
    ensemble.biases[-1][..., :out_dim] = solution[:, -1:].to(ensemble.biases[-1])
    return {"mean_head/train_rmse_before": before, "mean_head/train_rmse": rmse(solution)}
