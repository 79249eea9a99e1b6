"""`mbrl-bilevel bench plan`: CEM planning time per env step of PETS presets, and its ratio to the
floating-point lower bound of the model evaluations in that step.

Lower bound: every candidate × particle × horizon row evaluated goes once through one elite
member's MLP, 2·Σ(in·out) FLOPs of linear layers per row, at this thread's fp32 matmul rate
(a 1024² matmul, timed between the planning steps so that both see similar load). Times are this
thread's CPU time (time.thread_time). The model is a freshly initialised ensemble with the
preset's sizes and the HalfCheetah-v5 task reward, so each step costs what a trained one would.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from agents.pets import PETS, PLAN_DTYPES, PRESETS, PETSConfig
from agents.planners import CEMPlanner
from agents.propagation import TrajectoryEvaluator
from envs.tasks import half_cheetah_reward, never_terminated
from mbrl_bilevel.bench import PlanBenchConfig
from mbrl_bilevel.ensemble import GaussianEnsemble
from mbrl_bilevel.train_bench import linear_flops_per_row, matmul_seconds
from mbrl_bilevel.validation import ConfigError


class CountingObjective:
    """Wraps an objective and counts the candidate sequences it evaluates."""

    def __init__(self, objective):
        self.objective, self.candidates = objective, 0

    def __call__(self, actions: torch.Tensor) -> torch.Tensor:
        self.candidates += len(actions)
        return self.objective(actions)


def time_preset(config: PETSConfig, dtype: str, bench: PlanBenchConfig) -> dict:
    """Median and best CPU seconds per planning step, model rows per step and the best matmul
    rate (FLOP/s) seen between the steps."""
    obs_dim, action_dim = bench.obs_dim, bench.action_dim
    sizes, config = config.model, config.planner
    generator = torch.Generator().manual_seed(0)
    model = GaussianEnsemble(
        obs_dim + action_dim, obs_dim, sizes.members, sizes.elite_members, sizes.hidden
    )
    model.fit_normaliser(
        torch.randn(256, obs_dim + action_dim, generator=generator),
        0.1 * torch.randn(256, obs_dim, generator=generator),
    )
    model.elite_mask.copy_(torch.arange(sizes.members) < sizes.elite_members)
    planner = CEMPlanner(
        -torch.ones(action_dim), torch.ones(action_dim), config.cem_config(), generator
    )
    evaluator = TrajectoryEvaluator(
        model,
        half_cheetah_reward,
        never_terminated,
        config.particles,
        config.propagation,
        generator,
        PLAN_DTYPES[dtype],
    )
    seconds, matmul = [], float("inf")
    for step in range(bench.steps + 1):  # step 0 warms up
        matmul = min(matmul, matmul_seconds())
        objective = CountingObjective(evaluator)
        start = time.thread_time()
        evaluator.set_start(torch.randn(obs_dim, generator=generator))
        planner.act(objective)
        if step:
            seconds.append(time.thread_time() - start)
    rows = objective.candidates * evaluator.particles * config.horizon
    return {
        "median": statistics.median(seconds),
        "best": min(seconds),
        "rows": rows,
        "matmul_rate": 2 * 1024**3 / min(matmul, matmul_seconds()),
    }


def plan_row(name: str, preset: PETSConfig, dtype: str, bench: PlanBenchConfig) -> dict:
    """Time one preset in one dtype: ms per env step (median, best), model GFLOP per step, the
    fp32 matmul rate, the lower bound and the ratios to it."""
    inputs = bench.obs_dim + bench.action_dim
    timed = time_preset(preset, dtype, bench)
    flops = timed["rows"] * linear_flops_per_row(inputs, bench.obs_dim, preset.model.hidden)
    bound = flops / timed["matmul_rate"]
    return {
        "preset": name,
        "dtype": dtype,
        "ms_per_step": 1e3 * timed["median"],
        "best_ms": 1e3 * timed["best"],
        "model_gflop": flops / 1e9,
        "matmul_gflops": timed["matmul_rate"] / 1e9,
        "bound_ms": 1e3 * bound,
        "ratio": timed["median"] / bound,
        "best_ratio": timed["best"] / bound,
    }


def run_plan_bench(config: PlanBenchConfig) -> tuple[list[dict], dict]:
    """One row per preset and dtype: ms per env step (median, best), model GFLOP per step, the
    fp32 matmul rate, the lower bound and the ratios to it; and the context."""
    presets = [name.strip() for name in config.presets.split(",") if name.strip()]
    dtypes = [name.strip() for name in config.dtypes.split(",") if name.strip()]
    for name in presets:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    for name in dtypes:
        if name not in PLAN_DTYPES:
            raise ConfigError(f"unknown dtype {name!r}; choose from {sorted(PLAN_DTYPES)}")
    if not presets or not dtypes:
        raise ConfigError("--plan.presets and --plan.dtypes must name at least one each")
    if min(config.action_dim, config.steps, config.threads) <= 0 or config.obs_dim < 9:
        raise ConfigError(
            "need --plan.obs-dim >= 9 (the HalfCheetah reward reads obs[8]) and --plan.action-dim, "
            "--plan.steps, --plan.threads > 0"
        )
    torch.set_num_threads(config.threads)
    load_before = os.getloadavg()[0]
    rows = [
        plan_row(name, PETS.preset(name, "HalfCheetah-v5"), dtype, config)
        for name in presets
        for dtype in dtypes
    ]
    context = {
        "threads": config.threads,
        "cpu_count": os.cpu_count(),
        "load_average_1min_before_after": [load_before, os.getloadavg()[0]],
    }
    return rows, context
