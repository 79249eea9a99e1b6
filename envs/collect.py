"""Collect transitions from an env with a random policy or a Stable-Baselines3 policy."""

from __future__ import annotations

import sys
from collections.abc import Callable

import gymnasium as gym
import numpy as np
from stable_baselines3 import SAC
from stable_baselines3.common.base_class import BaseAlgorithm
from tqdm import tqdm

from mbrl_bilevel.transitions import Transitions
from mbrl_bilevel.validation import ConfigError

Policy = Callable[[np.ndarray], np.ndarray]
"""obs [O] -> action [A]."""


def show_progress(progress: bool) -> bool:
    """Progress bars only when asked and stderr is a terminal."""
    return progress and sys.stderr.isatty()


def random_policy(env: gym.Env) -> Policy:
    """Uniform actions from env.action_space (seed it for reproducible data)."""
    return lambda obs: env.action_space.sample()


def sb3_policy(model: BaseAlgorithm, deterministic: bool = False) -> Policy:
    """The policy of a trained Stable-Baselines3 model; stochastic by default for data diversity."""
    return lambda obs: model.predict(obs, deterministic=deterministic)[0]


def collect(
    env: gym.Env,
    steps: int,
    policy: Policy | None = None,
    seed: int | None = None,
    progress: bool = True,
) -> Transitions:
    """Run `policy` (default: random) for `steps` env steps, resetting when an episode ends.

    With a seed, the env and its action space are seeded first; without one they continue from
    their current state (e.g. the seed given to make_env).

    Returns Transitions with N = steps, observations float32. The last transition is marked
    truncated when its episode did not end, so episodes are always delimited.
    """
    if steps <= 0:
        raise ConfigError(f"the number of steps to collect must be > 0, got {steps}")
    policy = policy or random_policy(env)
    if seed is not None:
        env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    rows: dict[str, list] = {
        key: [] for key in ("obs", "action", "reward", "next", "term", "trunc")
    }
    for _ in tqdm(range(steps), desc="collect", disable=not show_progress(progress)):
        action = np.asarray(policy(obs), dtype=np.float32)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        for key, value in zip(
            rows, (obs, action, reward, next_obs, terminated, truncated), strict=True
        ):
            rows[key].append(value)
        obs = env.reset()[0] if terminated or truncated else next_obs
    truncations = np.array(rows["trunc"], dtype=bool)
    terminations = np.array(rows["term"], dtype=bool)
    truncations[-1] |= not terminations[-1]
    return Transitions(
        observations=np.array(rows["obs"], dtype=np.float32),
        actions=np.array(rows["action"], dtype=np.float32),
        rewards=np.array(rows["reward"], dtype=np.float32),
        next_observations=np.array(rows["next"], dtype=np.float32),
        terminations=terminations,
        truncations=truncations,
    )


def train_sac(env: gym.Env, steps: int, seed: int = 0, progress: bool = True) -> SAC:
    """A Stable-Baselines3 SAC (default hyperparameters, CPU) trained for `steps` env steps."""
    if steps <= 0:
        raise ConfigError(f"the number of SAC training steps must be > 0, got {steps}")
    model = SAC("MlpPolicy", env, seed=seed, device="cpu", verbose=0)
    model.learn(total_timesteps=steps, progress_bar=show_progress(progress))
    return model


def collect_with_sac(
    env: gym.Env, steps: int, sac_steps: int, seed: int = 0, progress: bool = True
) -> Transitions:
    """A "medium" dataset: train SAC for `sac_steps`, then collect `steps` with its stochastic policy."""
    model = train_sac(env, sac_steps, seed=seed, progress=progress)
    return collect(env, steps, sb3_policy(model), seed=seed, progress=progress)
