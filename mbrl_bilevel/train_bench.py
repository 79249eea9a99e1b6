"""`mbrl-bilevel bench train`: ensemble training throughput per strategy, and the same as a share of
this machine's fp32 matrix-multiply rate measured in the same run.

FLOPs counted per training step: 6·E·B·Σ(in·out) over the linear layers (2 for the forward
matmul, 4 for the two backward matmuls); everything else (activations, sampling, log-probs, Adam)
is overhead the ratio charges against the ensemble. Times are this thread's CPU time
(time.thread_time, 1 torch thread by default), so other processes sharing the cores slow both
measurements alike instead of skewing the ratio.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from mbrl_bilevel.data import Dataset
from mbrl_bilevel.ensemble import GaussianEnsemble
from mbrl_bilevel.learners import PGOptions, make_dynamics_learner
from mbrl_bilevel.training import FitConfig
from mbrl_bilevel.validation import ConfigError


@dataclass(frozen=True)
class TrainBenchConfig:
    """Options of `bench train`."""

    strategies: str = (
        "mse,nll,nll-beta,pg-identity,pg-plugin,pg-plugin-input,pg-plugin-input-beta,bilevel,"
        "bilevel-input"
    )
    """Comma-separated strategies to time (see `mbrl-bilevel dynamics`); the reward updates of
    pg-plugin and bilevel (every 50 steps) are included, amortised per step; pg-plugin-input-beta's
    variance phase, once per fit like the final validation, is not (docs/results/dynamics.md times it)."""
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
    steps: int = 50
    """Training steps per timed round."""
    rounds: int = 4
    """Timed rounds per strategy (after one warm-up round); the best round counts, and the
    matmul rate is the best of timings taken between rounds, so both see similar load."""
    threads: int = 1
    """Torch threads for both measurements."""


def linear_flops_per_row(in_dim: int, out_dim: int, hidden: tuple[int, ...]) -> int:
    """2·Σ(in·out): the forward matmuls of one member for one input row (outputs mean and
    log-variance, 2·out_dim)."""
    dims = [in_dim, *hidden, 2 * out_dim]
    return 2 * sum(a * b for a, b in zip(dims[:-1], dims[1:], strict=True))


def linear_flops_per_step(
    in_dim: int, out_dim: int, hidden: tuple[int, ...], members: int, batch: int
):
    """6·E·B·Σ(in·out): forward and backward matmuls of every linear layer."""
    return 3 * members * batch * linear_flops_per_row(in_dim, out_dim, hidden)


def matmul_seconds(size: int = 1024, repeats: int = 5) -> float:
    """Best CPU time of one fp32 size × size matmul over `repeats` timings."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        torch.mm(a, b, out=out)
        best = min(best, time.thread_time() - start)
    return best


def training_step_seconds(strategy: str, config: TrainBenchConfig, hidden: tuple[int, ...]):
    """Best per-step CPU time over `rounds` timed learner.fit calls (bootstrap batches [E, B],
    loss in normalised units, log-variance penalty, Adam, reward updates; one validation at the
    end of each round), and the matmul rate (FLOP/s) measured between those rounds, best of all."""
    torch.manual_seed(0)
    in_dim, out_dim = config.obs_dim + config.action_dim, config.obs_dim
    data = Dataset(
        torch.randn(16 * config.batch_size, in_dim), torch.randn(16 * config.batch_size, out_dim)
    )
    val = Dataset(torch.randn(config.batch_size, in_dim), torch.randn(config.batch_size, out_dim))
    ensemble = GaussianEnsemble(in_dim, out_dim, config.members, min(5, config.members), hidden)
    fit_config = FitConfig(
        steps=config.steps, lr=1e-4, batch_size=config.batch_size, eval_every=config.steps
    )
    options = PGOptions(variance_phase=False)
    learner = make_dynamics_learner(
        strategy, fit_config, in_dim, out_dim, options=options, progress=False
    )
    learner.fit(ensemble, data, val)  # warm-up
    step, matmul = float("inf"), float("inf")
    for _ in range(config.rounds):
        matmul = min(matmul, matmul_seconds())
        start = time.thread_time()
        learner.fit(ensemble, data, val)
        step = min(step, (time.thread_time() - start) / config.steps)
    return step, 2 * 1024**3 / min(matmul, matmul_seconds())


def run_train_bench(config: TrainBenchConfig) -> tuple[list[dict], dict]:
    """One row per strategy (transitions/s, achieved linear-layer GFLOP/s, share of the matmul
    rate) and the context (threads, FLOPs per step, load average before/after)."""
    from mbrl_bilevel.dynamics import DynamicsConfig

    if min(config.members, config.batch_size, config.steps, config.rounds, config.threads) <= 0:
        raise ConfigError("--members, --batch-size, --steps, --rounds and --threads must be > 0")
    hidden = DynamicsConfig(hidden=config.hidden).hidden_sizes()
    strategies = DynamicsConfig(strategies=config.strategies).strategy_list()
    torch.set_num_threads(config.threads)
    load_before = os.getloadavg()[0]
    flops = linear_flops_per_step(
        config.obs_dim + config.action_dim,
        config.obs_dim,
        hidden,
        config.members,
        config.batch_size,
    )
    rows = []
    for strategy in strategies:
        seconds, peak = training_step_seconds(strategy, config, hidden)
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
    context = {
        "threads": config.threads,
        "cpu_count": os.cpu_count(),
        "flops_per_step": flops,
        "load_average_1min_before_after": [load_before, os.getloadavg()[0]],
    }
    return rows, context
