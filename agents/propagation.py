"""Expected returns of action sequences under a probabilistic ensemble (PETS's trajectory sampling).

Each candidate sequence is rolled out by K particles. Particles are split evenly over the elite
members: TS∞ keeps each particle on one member for the whole horizon, TS1 reshuffles them at
every step, and `expectation` propagates the elites' mean prediction without sampling. Returns
accumulate until the task's termination function fires. Only the elite members run: `set_start`
takes a frozen copy of them (GaussianEnsemble.frozen_members) in the planning dtype.

Without a task reward the model predicts it: its last output column is the reward, each particle
collects the mean of its member's predicted reward, and nothing terminates.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from envs.tasks import never_terminated
from mbrl_bilevel.validation import ConfigError

PROPAGATIONS = ("ts1", "tsinf", "expectation")
TaskFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class TrajectoryEvaluator:
    """objective(actions [N, H, A]) -> mean return over particles [N], from a fixed start state.

    `model` is a GaussianEnsemble (or anything with `elite_mask` [E], `out_dim` and
    `frozen_members(index, dtype)` -> f(x [E', B, O + A]) -> (mean, std) [E', B, D]) over
    Δ-states (D = O), or over [Δ-state, reward] (D = O + 1) when `reward` is None.
    `terminated` None (or envs.tasks.never_terminated) means never. Sampling draws from
    `generator`, so plans are reproducible.
    """

    def __init__(
        self,
        model: nn.Module,
        reward: TaskFunction | None,
        terminated: TaskFunction | None,
        particles: int = 20,
        propagation: str = "tsinf",
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        if propagation not in PROPAGATIONS:
            raise ConfigError(f"unknown propagation {propagation!r}; choose from {PROPAGATIONS}")
        if particles <= 0:
            raise ConfigError(f"particles must be > 0, got {particles}")
        self.model, self.reward = model, reward
        self.terminated = None if terminated is never_terminated else terminated
        self.particles = 1 if propagation == "expectation" else particles
        self.propagation, self.dtype = propagation, dtype
        self.generator = generator or torch.Generator().manual_seed(0)
        self.start: torch.Tensor | None = None
        self.members, self.member_count, self.version = None, 0, None

    def set_start(self, observation: torch.Tensor) -> None:
        """The state s_0 [O] every rollout starts from; snapshots the model's elite members
        again if the model has changed since the last call."""
        self.start = observation.float()
        expected = len(self.start) + (self.reward is None)
        if self.model.out_dim != expected:
            raise ConfigError(
                f"the model predicts {self.model.out_dim} values; planning from {len(self.start)}"
                f"-dim states {'with a learned' if self.reward is None else 'with a task'} reward "
                f"needs {expected}"
            )
        version = model_version(self.model)
        if version != self.version:  # new weights, normaliser or elites since the last snapshot
            elites = self.model.elite_mask.nonzero().squeeze(-1)
            self.members = self.model.frozen_members(elites, self.dtype)
            self.member_count, self.version = len(elites), version

    @torch.inference_mode()
    def __call__(self, actions: torch.Tensor) -> torch.Tensor:
        if self.start is None:
            raise RuntimeError("call set_start(observation) before evaluating plans")
        candidates, horizon, _ = actions.shape
        obs_dim, members = len(self.start), self.member_count
        groups = 1 if self.propagation == "expectation" else members
        count = candidates * self.particles
        per_group = -(-count // groups)  # ceil: padding particles repeat the first ones
        total = groups * per_group
        particle = torch.randperm(total, generator=self.generator)  # [G·n], slot -> particle
        sequence = particle % count // self.particles  # slot -> candidate
        steps = actions.transpose(0, 1).contiguous()  # [H, N, A]
        state = self.start.expand(groups, per_group, -1)
        returns = torch.zeros(groups, per_group)
        alive = torch.ones(groups, per_group, dtype=torch.bool)
        noise = torch.empty(groups, per_group, obs_dim)
        for t in range(horizon):
            if self.propagation == "ts1" and t > 0:
                shuffle = torch.randperm(total, generator=self.generator)
                particle, sequence = particle[shuffle], sequence[shuffle]
                state, returns, alive = (
                    v.reshape(total, *v.shape[2:])[shuffle].view_as(v)
                    for v in (state, returns, alive)
                )
            action = steps[t].index_select(0, sequence).view(groups, per_group, -1)
            mean, std = self.members(torch.cat([state, action], -1).expand(members, -1, -1))
            if self.propagation == "expectation":
                mean = mean.mean(0, keepdim=True)
                next_state = state + mean[..., :obs_dim]
            else:
                noise.normal_(generator=self.generator)
                next_state = torch.addcmul(mean[..., :obs_dim], std[..., :obs_dim], noise)
                next_state += state
            if self.reward is None:
                reward = mean[..., obs_dim]
            else:
                reward = self.reward(state, action, next_state)
            if self.terminated is None:
                returns += reward
            else:
                returns += torch.where(alive, reward, 0.0)
                alive &= ~self.terminated(state, action, next_state)
            state = next_state
        by_particle = torch.empty(total).index_copy_(0, particle, returns.flatten())
        return by_particle[:count].view(candidates, self.particles).mean(1)


def model_version(model: nn.Module) -> tuple[tuple[int, int], ...]:
    """Identity and in-place version counter of every parameter and buffer: changes whenever
    training, load_state_dict, fit_normaliser or select_elites touches the model."""
    tensors = [*model.parameters(), *model.buffers()]
    return tuple((id(tensor), tensor._version) for tensor in tensors)
