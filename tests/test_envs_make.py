"""make_env: clear errors for unknown ids and non-continuous envs; seeding; the point-mass task."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from envs import POINT_MASS_ID, make_env
from mbrl_bilevel.validation import ConfigError


def test_unknown_env_id_is_a_config_error():
    with pytest.raises(ConfigError, match="'Nope-v9'"):
        make_env("Nope-v9")


def test_discrete_action_space_is_refused_naming_the_space():
    with pytest.raises(ConfigError, match=r"CartPole-v1 has the action space Discrete\(2\)"):
        make_env("CartPole-v1")


class ImageObservationEnv(gym.Env):
    observation_space = gym.spaces.Box(0, 255, (8, 8, 3), np.uint8)
    action_space = gym.spaces.Box(-1, 1, (2,), np.float32)


def test_non_vector_observations_are_refused():
    gym.register("test_envs/Image-v0", entry_point=ImageObservationEnv)
    try:
        with pytest.raises(ConfigError, match=r"Image-v0 has the observation space Box\(0, 255"):
            make_env("test_envs/Image-v0")
    finally:
        del gym.registry["test_envs/Image-v0"]


def test_same_seed_same_episode_start_and_actions():
    runs = []
    for _ in range(2):
        env = make_env("Hopper-v5", seed=3)
        runs.append((env.reset()[0], env.action_space.sample()))
    other = make_env("Hopper-v5", seed=4)
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    assert not np.array_equal(runs[0][0], other.reset()[0])


def test_point_mass_passes_the_gymnasium_env_checker():
    env = make_env(POINT_MASS_ID)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env.unwrapped, skip_render_check=True)


def run_episode(env, policy):
    obs, _ = env.reset(seed=0)
    total, done, steps = 0.0, False, 0
    while not done:
        obs, reward, terminated, truncated, _ = env.step(policy(obs))
        total, done, steps = total + reward, terminated or truncated, steps + 1
    return total, steps


def test_point_mass_rewards_control_over_random_actions():
    env = make_env(POINT_MASS_ID, seed=0)
    controlled, steps = run_episode(env, lambda p: np.clip(-p / 0.1, -1, 1))
    randomly, _ = run_episode(env, lambda p: env.action_space.sample())
    assert steps == 50
    assert controlled > -8 and randomly < -20
