"""make_env: a seeded Gymnasium env with continuous (Box) actions, or one clear ConfigError."""

from __future__ import annotations

from typing import Any

import gymnasium as gym

from mbrl_bilevel.validation import ConfigError


def make_env(env_id: str, seed: int | None = None, **kwargs: Any) -> gym.Env:
    """gym.make(env_id, **kwargs) with its action and observation spaces checked.

    The env must have a Box action space and a flat Box observation space. With a seed, the
    env is reset once with it and its spaces are seeded, so the next reset() and
    action_space.sample() are reproducible.
    """
    try:
        env = gym.make(env_id, **kwargs)
    except gym.error.Error as error:
        raise ConfigError(f"cannot make environment {env_id!r}: {error}") from None
    try:
        check_spaces(env, env_id)
    except ConfigError:
        env.close()
        raise
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
        env.observation_space.seed(seed)
    return env


def check_env_id(env_id: str) -> None:
    """Raise ConfigError unless `env_id` is registered with Gymnasium (PointMass included)."""
    try:
        gym.spec(env_id)
    except gym.error.Error as error:
        raise ConfigError(f"unknown environment {env_id!r}: {error}") from None


def check_spaces(env: gym.Env, env_id: str) -> None:
    """Raise ConfigError unless the actions and the observations are 1-D Box spaces."""
    if not isinstance(env.action_space, gym.spaces.Box) or len(env.action_space.shape) != 1:
        raise ConfigError(
            f"{env_id} has the action space {env.action_space}; mbrl-bilevel needs continuous "
            "actions (a flat gymnasium Box space)"
        )
    space = env.observation_space
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
        raise ConfigError(
            f"{env_id} has the observation space {space}; mbrl-bilevel needs a flat Box "
            "(a vector observation)"
        )
