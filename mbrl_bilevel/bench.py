"""`mbrl-bilevel bench train`: ensemble training throughput per strategy, and the same as a share of
this machine's fp32 matrix-multiply rate measured in the same run.

FLOPs counted per training step: 6·E·B·Σ(in·out) over the linear layers (2 for the forward
matmul, 4 for the two backward matmuls); everything else (activations, sampling, log-probs, Adam)
is overhead the ratio charges against the ensemble.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch
import tyro

from mbrl_bilevel.data import Dataset
from mbrl_bilevel.dynamics import make_loss
from mbrl_bilevel.ensemble import GaussianEnsemble, LogVarPenalty, NormalisedTargets
from mbrl_bilevel.validation import ConfigError


@dataclass(frozen=True)
class BenchConfig:
    """Benchmarks that print ratios measured in one process run."""

    what: tyro.conf.Positional[Literal["train"]]
    """What to measure: 'train' (ensemble training throughput)."""
    strategies: str = "mse,nll,nll-beta,pg-identity"
    """Comma-separated strategies to time (fixed-reward ones; see `mbrl-bilevel dynamics`)."""
    members: int = 7
    """Ensemble members E."""
    hidden: str = "200,200,200,200"
    """Hidden widths of each member."""
    batch_size: int = 256
    """Minibatch size B per member."""
    obs_dim: int = 17
    """Observation dimension (HalfCheetah-v5: 17)."""
    action_dim: int = 6
    """Action dimension (HalfCheetah-v5: 6)."""
    steps: int = 200
    """Timed training steps per strategy (after 20 warm-up steps)."""
    threads: int = 1
    """Torch threads for both measurements."""


def linear_flops_per_step(
    in_dim: int, out_dim: int, hidden: tuple[int, ...], members: int, batch: int
):
    """6·E·B·Σ(in·out): forward and backward matmuls of every linear layer."""
    dims = [in_dim, *hidden, 2 * out_dim]
    return 6 * members * batch * sum(a * b for a, b in zip(dims[:-1], dims[1:], strict=True))


def matmul_rate(size: int = 1024, seconds: float = 1.0) -> float:
    """fp32 FLOP/s of a square size × size matmul, best of repeated timings."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def training_step_seconds(strategy: str, config: BenchConfig, hidden: tuple[int, ...]) -> float:
    """Mean wall time of one EnsembleLearner-equivalent training step (bootstrap batch of
    [E, B] rows, loss in normalised units, log-variance penalty, Adam)."""
    from mbrl_bilevel.dynamics import DynamicsConfig

    torch.manual_seed(0)
    in_dim, out_dim, E, B = (
        config.obs_dim + config.action_dim,
        config.obs_dim,
        config.members,
        config.batch_size,
    )
    x, y = torch.randn(E, 8 * B, in_dim), torch.randn(E, 8 * B, out_dim)
    ensemble = GaussianEnsemble(in_dim, out_dim, E, min(5, E), hidden)
    view = NormalisedTargets(ensemble)
    flat = Dataset(x[0], y[0])
    loss = LogVarPenalty(make_loss(strategy, flat, DynamicsConfig()), 0.01)
    optimizer = torch.optim.Adam(ensemble.parameters(), lr=1e-4)

    def step(i: int) -> None:
        rows = slice((i % 8) * B, (i % 8 + 1) * B)
        value, _ = loss(view, x[:, rows], y[:, rows])
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()

    for i in range(20):
        step(i)
    start = time.perf_counter()
    for i in range(config.steps):
        step(i)
    return (time.perf_counter() - start) / config.steps


def run_train_bench(config: BenchConfig) -> list[dict[str, float | str]]:
    """One row per strategy: transitions/s, achieved linear-layer GFLOP/s, share of matmul rate."""
    from mbrl_bilevel.dynamics import DynamicsConfig

    if config.members <= 0 or config.batch_size <= 0 or config.steps <= 0:
        raise ConfigError("--members, --batch-size and --steps must be > 0")
    hidden = DynamicsConfig(hidden=config.hidden).hidden_sizes()
    strategies = DynamicsConfig(strategies=config.strategies).strategy_list()
    torch.set_num_threads(config.threads)
    peak = matmul_rate()
    flops = linear_flops_per_step(
        config.obs_dim + config.action_dim,
        config.obs_dim,
        hidden,
        config.members,
        config.batch_size,
    )
    rows = []
    for strategy in strategies:
        seconds = training_step_seconds(strategy, config, hidden)
        rows.append(
            {
                "strategy": strategy,
                "transitions_per_s": config.batch_size / seconds,
                "member_samples_per_s": config.members * config.batch_size / seconds,
                "gflops": flops / seconds / 1e9,
                "matmul_gflops": peak / 1e9,
                "share_of_matmul": flops / seconds / peak,
            }
        )
    return rows
