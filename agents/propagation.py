"""Expected returns of action sequences under a probabilistic ensemble (PETS's trajectory sampling).

Each candidate sequence is rolled out by K particles. Particles are split evenly over the elite
members: TS∞ keeps each particle on one member for the whole horizon, TS1 reshuffles them at
every step, and `expectation` propagates the elites' mean prediction without sampling. Returns
accumulate until the task's termination function fires.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mbrl_bilevel.validation import ConfigError

PROPAGATIONS = ("ts1", "tsinf", "expectation")
TaskFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class TrajectoryEvaluator:
    """objective(actions [N, H, A]) -> mean return over particles [N], from a fixed start state.

    `model(x [M, B, O + A])` must return a diagonal Gaussian over Δ-states with batch [M, B] and
    event O, one row per member (a GaussianEnsemble); `elite_mask` [M] selects the members used.
    Sampling draws from `generator`, so plans are reproducible.
    """

    def __init__(
        self,
        model: nn.Module,
        reward: TaskFunction,
        terminated: TaskFunction,
        particles: int = 20,
        propagation: str = "tsinf",
        generator: torch.Generator | None = None,
    ):
        if propagation not in PROPAGATIONS:
            raise ConfigError(f"unknown propagation {propagation!r}; choose from {PROPAGATIONS}")
        if particles <= 0:
            raise ConfigError(f"particles must be > 0, got {particles}")
        self.model, self.reward, self.terminated = model, reward, terminated
        self.particles = 1 if propagation == "expectation" else particles
        self.propagation = propagation
        self.generator = generator or torch.Generator().manual_seed(0)
        self.start: torch.Tensor | None = None

    def set_start(self, observation: torch.Tensor) -> None:
        """The state s_0 [O] every rollout starts from."""
        self.start = observation.float()

    def _members(self) -> torch.Tensor:
        mask = getattr(self.model, "elite_mask", None)
        return mask.nonzero().squeeze(-1) if mask is not None else torch.arange(self.model.members)

    @torch.no_grad()
    def __call__(self, actions: torch.Tensor) -> torch.Tensor:
        if self.start is None:
            raise RuntimeError("call set_start(observation) before evaluating plans")
        candidates, horizon, _ = actions.shape
        members = self._members()
        count = candidates * self.particles
        per_member = -(-count // len(members))  # ceil: pad so every member gets as many
        total = per_member * len(members)
        actions = actions.repeat_interleave(self.particles, dim=0)
        actions = torch.cat([actions, actions[: total - count]]) if total > count else actions
        state = self.start.expand(total, -1)
        order = torch.randperm(total, generator=self.generator)
        returns = torch.zeros(total)
        alive = torch.ones(total, dtype=torch.bool)
        for t in range(horizon):
            if self.propagation == "ts1":
                order = torch.randperm(total, generator=self.generator)
            action = actions[:, t]
            next_state = state + self._delta(state, action, order, members, per_member)
            reward = self.reward(state, action, next_state)
            returns += torch.where(alive, reward, torch.zeros_like(reward))
            alive &= ~self.terminated(state, action, next_state)
            state = next_state
        return returns[:count].view(candidates, self.particles).mean(1)

    def _delta(self, state, action, order, members, per_member) -> torch.Tensor:
        """Δ-state [total, O]. Sampling: particle order[i] goes to member members[i // per_member].
        Expectation: the mean over the elite members of their mean predictions."""
        x = torch.cat([state, action], dim=-1)
        if self.propagation == "expectation":
            return self.model(x).mean[members].mean(0)
        grouped = x[order].view(len(members), per_member, -1)
        full = grouped.new_zeros(self.model.members, per_member, x.shape[-1])
        full[members] = grouped
        dist = self.model(full)  # diagonal Gaussian: noise from our own generator, reproducibly
        noise = torch.randn(dist.mean.shape, generator=self.generator)
        delta = (dist.mean + dist.stddev * noise)[members]
        out = torch.empty(len(order), delta.shape[-1])
        out[order] = delta.reshape(len(order), -1)
        return out
