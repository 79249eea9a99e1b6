"""MBPO's branched rollouts: short model trajectories that start from real states, each step
drawn from one random elite member, with the task's reward and termination functions, and the
rollout-length schedule."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from envs.tasks import TaskFunctions
from mbrl_bilevel.ensemble import GaussianEnsemble

Policy = Callable[[Tensor], Tensor]
"""obs [B, O] -> env action [B, A]."""


def rollout_length(schedule: tuple[int, int, int, int], step: int) -> int:
    """MBPO's schedule (start step, end step, start length, end length): the length grows
    linearly between the two steps and is constant outside them (rounded down)."""
    start, end, low, high = schedule
    share = min(max((step - start) / max(end - start, 1), 0.0), 1.0)
    return int(low + share * (high - low))


@dataclass
class RolloutStats:
    """Per rollout round: transitions made, the share of start states whose rollout reached a
    terminal state within `length` steps, and the mean ensemble disagreement (std of the elite
    means, in normalised target units)."""

    transitions: int
    terminated_share: float
    model_std: float


@torch.no_grad()
def branched_rollouts(
    model: GaussianEnsemble,
    policy: Policy,
    task: TaskFunctions,
    starts: Tensor,
    length: int,
    generator: torch.Generator,
) -> tuple[dict[str, np.ndarray], RolloutStats]:
    """Roll out `length` model steps from each row of starts [B, O]; a terminated rollout stops.

    Returns arrays keyed observations [N, O], actions [N, A] (env units), rewards [N],
    next_observations [N, O], dones [N] (1.0 where the task terminated), N <= B · length, and
    the round's RolloutStats.
    """
    elites = model.elite_mask.nonzero().squeeze(-1)
    obs, parts, stds = starts, [], []
    for _ in range(length):
        action = policy(obs)
        means, scales = member_moments(model, torch.cat([obs, action], dim=-1))
        member = elites[torch.randint(len(elites), (len(obs),), generator=generator)]
        rows = torch.arange(len(obs))
        loc, scale = means[member, rows], scales[member, rows]
        noise = torch.randn(loc.shape, generator=generator)
        next_obs = obs + loc + scale * noise
        reward = task.reward(obs, action, next_obs)
        done = task.terminated(obs, action, next_obs)
        stds.append((means[elites].std(0) / model.target_std).mean(-1))
        parts.append((obs, action, reward, next_obs, done.float()))
        obs = next_obs[~done]
        if len(obs) == 0:
            break
    names = ("observations", "actions", "rewards", "next_observations", "dones")
    columns = zip(*parts, strict=True)
    arrays = {name: torch.cat(column).numpy() for name, column in zip(names, columns, strict=True)}
    terminated = float(arrays["dones"].sum()) / max(len(starts), 1)
    std = float(torch.cat(stds).mean()) if len(elites) > 1 else 0.0
    return arrays, RolloutStats(len(arrays["rewards"]), terminated, std)


def member_moments(model: GaussianEnsemble, x: Tensor, chunk: int = 8192) -> tuple[Tensor, Tensor]:
    """Every member's mean and std [E, B, O] for x [B, in], in chunks of rows to bound memory."""
    dists = [model(part).base_dist for part in x.split(chunk)]
    return torch.cat([d.loc for d in dists], 1), torch.cat([d.scale for d in dists], 1)
