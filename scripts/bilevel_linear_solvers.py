"""How the IFT linear solver (cg, minres, dense) changes the reward the `bilevel` dynamics learner
learns, on the closed-form check of tests/test_reward_updates.py: y = xW + ε with noise std
(0.3, 0.05), a 3-member ensemble, U* = (λ/2)/σ² in normalised units.

    python scripts/bilevel_linear_solvers.py --methods cg,minres,dense --seeds 4

Two scenarios per seed: `follows` (two fits, the noise shrinking fourfold in between, plug-in
start) and `no-plugin` (one 1500-step fit from U = λ/2, outer lr 0.1). Prints, per method and
seed, max_d max(U_d/U*_d, U*_d/U_d) (1 is exact) and the mean relative residual of the solves.
"""

from __future__ import annotations

import argparse

import torch

from mbrl_bilevel.data import Dataset
from mbrl_bilevel.ensemble import GaussianEnsemble
from mbrl_bilevel.learners import PGOptions, make_dynamics_learner
from mbrl_bilevel.solvers.linear import LinearSolverConfig
from mbrl_bilevel.training import FitConfig

NOISE = torch.tensor([0.3, 0.05])
W_TRUE = torch.tensor([[1.0, 0.5], [-0.5, 1.0], [0.2, 0.0]])


def linear_data(n: int, seed: int, shrink: float = 1.0) -> Dataset:
    """x [n, 3] ~ N(0, I), y = xW + ε/shrink [n, 2]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return Dataset(x, x @ W_TRUE + NOISE / shrink * torch.randn(n, 2, generator=g))


class Residuals:
    """A SummaryWriter stand-in that keeps the solver/residual scalars."""

    def __init__(self):
        self.values: list[float] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if tag == "solver/residual":
            self.values.append(value)


def run(method: str, seed: int, scenario: str) -> tuple[float, float]:
    """(worst ratio of U to U*, mean solve residual) of one scenario."""
    torch.manual_seed(seed)
    ensemble = GaussianEnsemble(3, 2, members=3, elites=2, hidden=(32, 32))
    steps, outer_lr = (400, 0.05) if scenario == "follows" else (1500, 0.1)
    config = FitConfig(steps=steps, lr=5e-3, batch_size=256, eval_every=100)
    options = PGOptions(refresh_every=20, hyper_batch=512, outer_lr=outer_lr)
    residuals = Residuals()
    learner = make_dynamics_learner(
        "bilevel", config, 3, 2, writer=residuals, options=options, progress=False
    )
    learner.update.linear = LinearSolverConfig(
        method=method, damping=1e-2, max_iter=10, tol=1e-2, warn=False
    )
    learner.update.plugin_start = scenario == "follows"
    learner.fit(ensemble, linear_data(3000, 1), linear_data(1000, 2))
    shrink = 1.0
    if scenario == "follows":
        shrink = 4.0
        learner.fit(ensemble, linear_data(3000, 3, shrink), linear_data(1000, 4, shrink))
    u = learner.update.reward.matrix().diagonal().detach()
    u_star = 0.5 / (NOISE / shrink / ensemble.target_std) ** 2
    worst = float((u / u_star).log().abs().max().exp())
    return worst, sum(residuals.values) / len(residuals.values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="cg,minres,dense")
    parser.add_argument("--seeds", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for scenario in ("follows", "no-plugin"):
        for method in args.methods.split(","):
            rows = [run(method, seed, scenario) for seed in range(args.seeds)]
            ratios = ", ".join(f"{r:.2f}" for r, _ in rows)
            residual = sum(r for _, r in rows) / len(rows)
            print(
                f"{scenario:9s} {method:6s} U/U* worst ratio per seed: {ratios}; "
                f"mean residual {residual:.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
