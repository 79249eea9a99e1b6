"""The torch task rewards and terminations against the real v5 envs on recorded random transitions.

Exact tasks must match to float rounding; approximate ones (forward velocity not in the
observation) within the tolerances docs/envs.md reports. Terminations must match exactly, and
the recordings of the terminating tasks must contain terminal states.
"""

import numpy as np
import pytest
import torch

from envs import make_env, task_functions

EXACT = 1e-5
# env id: (steps, max |error| allowed, mean |error| allowed, terminates under random actions)
CASES = {
    "HalfCheetah-v5": (300, 1.0, 0.1, False),
    "Hopper-v5": (300, 0.1, 0.005, True),
    "Walker2d-v5": (300, 0.3, 0.02, True),
    "Ant-v5": (400, 1.0, 0.1, True),
    "Swimmer-v5": (300, 0.5, 0.02, False),
    "Reacher-v5": (300, EXACT, EXACT, False),
    "Pusher-v5": (300, EXACT, EXACT, False),
    "InvertedPendulum-v5": (300, EXACT, EXACT, True),
    "InvertedDoublePendulum-v5": (300, 5e-4, 5e-5, True),
    "mbrl_bilevel/PointMass-v0": (150, EXACT, EXACT, False),
}


def record(env_id: str, steps: int, seed: int = 0):
    """obs, action, next_obs [N, .] float64, reward [N] float64, terminated [N] bool."""
    env = make_env(env_id, seed=seed)
    obs, _ = env.reset(seed=seed)
    rows = []
    for _ in range(steps):
        action = env.action_space.sample()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        rows.append((obs, action, next_obs, reward, terminated))
        obs = env.reset()[0] if terminated or truncated else next_obs
    env.close()
    columns = [np.array(column) for column in zip(*rows, strict=True)]
    *floats, terminated = columns
    return *(torch.as_tensor(c, dtype=torch.float64) for c in floats), torch.as_tensor(terminated)


@pytest.mark.parametrize("env_id", list(CASES))
def test_reward_and_termination_match_the_env(env_id):
    steps, max_error, mean_error, terminates = CASES[env_id]
    obs, action, next_obs, reward, terminated = record(env_id, steps)
    task = task_functions(env_id)
    error = (task.reward(obs, action, next_obs) - reward).abs()
    assert error.max() <= max_error, f"max error {error.max():.3g}"
    assert error.mean() <= mean_error, f"mean error {error.mean():.3g}"
    predicted = task.terminated(obs, action, next_obs)
    assert predicted.dtype == torch.bool
    assert torch.equal(predicted, terminated)
    assert bool(terminated.any()) == terminates


def test_functions_keep_leading_dims_and_dtype():
    obs, action, next_obs, _, _ = record("Hopper-v5", 40)
    task = task_functions("Hopper-v5")
    batched = [t.float().reshape(2, 4, 5, -1) for t in (obs, action, next_obs)]
    reward = task.reward(*batched)
    assert reward.shape == (2, 4, 5) and reward.dtype == torch.float32
    assert task.terminated(*batched).shape == (2, 4, 5)
    flat = task.reward(obs, action, next_obs).float()
    assert (reward.reshape(-1) - flat).abs().max() < 1e-5


def test_the_velocity_interpolation_beats_the_next_state_velocity():
    """The documented choice: the interpolated velocity, not the common s' velocity."""
    obs, action, next_obs, reward, _ = record("HalfCheetah-v5", 300)
    ours = (task_functions("HalfCheetah-v5").reward(obs, action, next_obs) - reward).abs().mean()
    common = (next_obs[:, 8] - 0.1 * action.square().sum(-1) - reward).abs().mean()
    assert ours < 0.6 * common


def test_unknown_tasks_have_no_reward_function():
    assert task_functions("Humanoid-v5") is None
    assert task_functions("HalfCheetah-v4") is None
