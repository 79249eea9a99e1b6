"""A tiny 2-D point-mass task for fast agent tests: move a point to the origin.

State and observation: position p in [-2, 2]^2, starting uniform in [-1, 1]^2. Action a in
[-1, 1]^2 moves it: p' = clip(p + 0.1 a, -2, 2) (walls that random actions rarely reach).
Reward -||p'|| - 0.01 ||a||^2 (dense), no termination, 50 steps per episode. Steering straight
to the origin returns about -2 per episode; uniform random actions keep the point roughly where
it started (about -41 on average).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

POINT_MASS_ID = "mbrl_bilevel/PointMass-v0"
STEP_SIZE = 0.1
BOUND = 2.0
CONTROL_COST = 0.01
EPISODE_STEPS = 50


class PointMassEnv(gym.Env):
    """Observation Box(-2, 2, (2,)) float32; action Box(-1, 1, (2,)) float32."""

    metadata = {"render_modes": []}

    def __init__(self):
        self.observation_space = gym.spaces.Box(-BOUND, BOUND, shape=(2,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self._position = np.zeros(2, dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._position = self.np_random.uniform(-1.0, 1.0, size=2).astype(np.float32)
        return self._position.copy(), {}

    def step(self, action):
        action = np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)
        moved = self._position + STEP_SIZE * action
        self._position = np.clip(moved, -BOUND, BOUND).astype(np.float32)
        reward = float(-np.linalg.norm(self._position) - CONTROL_COST * np.square(action).sum())
        return self._position.copy(), reward, False, False, {}


def point_mass_reward(obs: Tensor, action: Tensor, next_obs: Tensor) -> Tensor:
    """-||p'|| - 0.01 ||a||^2 [...] with the action clipped as the env clips it."""
    action = action.clamp(-1.0, 1.0)
    return -torch.linalg.vector_norm(next_obs, dim=-1) - CONTROL_COST * action.square().sum(-1)


def register_point_mass() -> None:
    """Register POINT_MASS_ID with Gymnasium (idempotent)."""
    if POINT_MASS_ID not in gym.registry:
        gym.register(
            POINT_MASS_ID,
            entry_point="envs.point_mass:PointMassEnv",
            max_episode_steps=EPISODE_STEPS,
        )
