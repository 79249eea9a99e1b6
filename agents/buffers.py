"""Replay data of MBPO: SB3's ReplayBuffer for real transitions, a ring buffer of model
transitions beside it, and one `sample` that mixes the two at a real-data ratio, so that SB3's
SAC.train(gradient_steps, batch_size) learns from both."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.type_aliases import ReplayBufferSamples

from mbrl_bilevel.transitions import Transitions

FIELDS = ("observations", "actions", "rewards", "next_observations", "dones")


class ModelBuffer:
    """The newest `capacity` model transitions: observations [N, O], actions [N, A] (SAC's scaled
    actions), rewards [N], next_observations [N, O], dones [N] (float, the task terminated)."""

    def __init__(self, obs_dim: int, action_dim: int, capacity: int = 0):
        widths = {"observations": obs_dim, "actions": action_dim, "next_observations": obs_dim}
        self.shapes = {name: (widths[name],) if name in widths else () for name in FIELDS}
        self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        """Empty arrays of `capacity` rows."""
        self.arrays = {
            name: np.zeros((capacity, *self.shapes[name]), np.float32) for name in FIELDS
        }
        self.size, self.pos = 0, 0

    @property
    def capacity(self) -> int:
        return len(self.arrays["rewards"])

    def __len__(self) -> int:
        return self.size

    def add(self, batch: dict[str, np.ndarray]) -> None:
        """Append a batch of rows (arrays keyed by FIELDS), overwriting the oldest when full."""
        n = len(batch["rewards"])
        if n >= self.capacity:
            for name in FIELDS:
                self.arrays[name][:] = batch[name][n - self.capacity :]
            self.size, self.pos = self.capacity, 0
            return
        index = (self.pos + np.arange(n)) % self.capacity
        for name in FIELDS:
            self.arrays[name][index] = batch[name]
        self.pos, self.size = (self.pos + n) % self.capacity, min(self.size + n, self.capacity)

    def newest(self, count: int) -> dict[str, np.ndarray]:
        """The newest min(count, size) rows, oldest first."""
        count = min(count, self.size)
        index = (self.pos - count + np.arange(count)) % max(self.capacity, 1)
        return {name: array[index] for name, array in self.arrays.items()}

    def state(self) -> dict[str, Any]:
        """The filled rows in storage order, the write position and the capacity."""
        arrays = {name: array[: self.size].copy() for name, array in self.arrays.items()}
        return {"arrays": arrays, "pos": self.pos, "capacity": self.capacity}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what `state` returned, rows in the same slots (sampling sees the same rows)."""
        self._allocate(state["capacity"])
        for name, rows in state["arrays"].items():
            self.arrays[name][: len(rows)] = rows
        self.size, self.pos = len(state["arrays"]["rewards"]), state["pos"]

    def resize(self, capacity: int) -> None:
        """Change the capacity, keeping the newest rows that fit."""
        if capacity == self.capacity:
            return
        kept = self.newest(capacity)
        self._allocate(capacity)
        if len(kept["rewards"]):
            self.add(kept)


class MixedReplayBuffer(ReplayBuffer):
    """SB3's ReplayBuffer of real transitions plus `model`, a ModelBuffer. `sample` draws
    round(real_ratio · batch) real rows and the rest from the model buffer (all real while it is
    empty), with its own seeded generator. Pass it to SAC as replay_buffer_class."""

    def __init__(self, *args, real_ratio: float = 0.05, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        obs_dim, action_dim = self.obs_shape[0], self.action_dim
        self.model = ModelBuffer(obs_dim, action_dim)
        self.real_ratio = real_ratio
        self.generator = np.random.default_rng(seed)

    def real_size(self) -> int:
        return self.buffer_size if self.full else self.pos

    def sample(self, batch_size: int, env=None) -> ReplayBufferSamples:
        """A batch of batch_size rows as torch tensors (rewards and dones [B, 1])."""
        n_real = batch_size if len(self.model) == 0 else int(round(self.real_ratio * batch_size))
        real = self.generator.integers(self.real_size(), size=n_real)
        parts = [
            self.observations[real, 0],
            self.actions[real, 0],
            self.next_observations[real, 0],
            self.dones[real, 0] * (1 - self.timeouts[real, 0]),
            self.rewards[real, 0],
        ]
        if n_real < batch_size:
            rows = self.generator.integers(len(self.model), size=batch_size - n_real)
            model = {name: array[rows] for name, array in self.model.arrays.items()}
            order = ("observations", "actions", "next_observations", "dones", "rewards")
            parts = [np.concatenate([p, model[name]]) for p, name in zip(parts, order, strict=True)]
        parts[3], parts[4] = parts[3][:, None], parts[4][:, None]
        return ReplayBufferSamples(*(torch.as_tensor(p, dtype=torch.float32) for p in parts))

    def real_transitions(self, unscale) -> Transitions:
        """All real rows as Transitions with env actions `unscale(actions)` (SAC stores actions
        scaled to [-1, 1])."""
        n = self.real_size()
        return Transitions(
            self.observations[:n, 0].astype(np.float32),
            unscale(self.actions[:n, 0]).astype(np.float32),
            self.rewards[:n, 0],
            self.next_observations[:n, 0].astype(np.float32),
            self.dones[:n, 0] > 0,
            self.timeouts[:n, 0] > 0,
        )

    def state(self) -> dict[str, Any]:
        """The filled rows, positions and generator state (what `load_state` restores)."""
        n = self.real_size()
        real = {name: getattr(self, name)[:n].copy() for name in (*FIELDS, "timeouts")}
        return {
            "real": real,
            "pos": self.pos,
            "full": self.full,
            "model": self.model.state(),
            "generator": self.generator.bit_generator.state,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        for name, rows in state["real"].items():
            getattr(self, name)[: len(rows)] = rows
        self.pos, self.full = state["pos"], state["full"]
        self.model.load_state(state["model"])
        self.generator.bit_generator.state = state["generator"]
