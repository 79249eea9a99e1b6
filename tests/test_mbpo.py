"""MBPO on the shipped point-mass task: the Dyna loop runs, rolls out, updates SAC, saves and
loads, is deterministic, resumes a killed run exactly, and its buffers and rollouts behave."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3.common.callbacks import BaseCallback

from agents.buffers import MixedReplayBuffer, ModelBuffer
from agents.mbpo import MBPO, PRESETS, DynaConfig
from agents.rollouts import branched_rollouts, rollout_length
from envs.make import make_env
from envs.point_mass import POINT_MASS_ID
from envs.tasks import TaskFunctions, never_terminated, task_functions
from mbrl_bilevel.configs import replace_fields
from mbrl_bilevel.ensemble import GaussianEnsemble
from mbrl_bilevel.validation import ConfigError

TINY = replace_fields(
    PRESETS["tiny"], {"model.random_steps": 50, "mbpo.train_every": 50, "mbpo.rollout_every": 25}
)
STEPS = 150  # 3 episodes of 50 steps


def train(steps=STEPS, callback=None, seed=0):
    agent = MBPO(make_env(POINT_MASS_ID, seed=seed), config=TINY, seed=seed)
    return agent.learn(steps, callback=callback)


@pytest.fixture(scope="module")
def trained():
    return train()


def test_dyna_loop_trains_model_rolls_out_and_updates_sac(trained):
    assert trained.num_timesteps == STEPS and len(trained.episode_returns) == 3
    assert trained.model_trained
    updates = TINY.mbpo.updates_per_step * (STEPS - TINY.model.random_steps + 1)
    assert trained.sac._n_updates == updates
    # rounds of length 1 at steps 50-125, of length 2 at 150: capacity 2 rounds · 200 · 2, full
    assert len(trained.buffer.model) == TINY.mbpo.retain_rounds * TINY.mbpo.rollout_batch * 2
    assert trained.buffer.real_size() == STEPS


def test_killed_run_resumes_exactly(tmp_path, trained):
    """A run killed in episode 3, checkpointed at episode ends 100 steps apart, resumes from the
    checkpoint after episode 2 and ends where an uninterrupted run with the same seed ends: same
    returns, same SAC weights."""
    from agents.commands import EpisodeCheckpoint

    class KillAt(BaseCallback):
        def _on_step(self):
            if self.num_timesteps >= 120:
                raise KeyboardInterrupt
            return True

    path = tmp_path / "agent.pt"
    with pytest.raises(KeyboardInterrupt):
        train(callback=[EpisodeCheckpoint(path, every=100), KillAt()])
    resumed = MBPO.load(path, make_env(POINT_MASS_ID, seed=0))
    assert resumed.num_timesteps == 100
    assert resumed.episode_returns == trained.episode_returns[:2]  # same seed, same returns
    resumed.learn(STEPS)
    assert resumed.episode_returns == trained.episode_returns
    for ours, theirs in zip(
        resumed.sac.policy.parameters(), trained.sac.policy.parameters(), strict=True
    ):
        assert torch.equal(ours, theirs)


def test_save_load_predicts_identical_actions(trained, tmp_path):
    trained.save(tmp_path / "agent.pt")
    loaded = MBPO.load(tmp_path / "agent.pt", make_env(POINT_MASS_ID, seed=5))
    obs = np.array([[0.7, -0.4], [-1.0, 0.2]], dtype=np.float32)
    assert np.array_equal(trained.predict(obs)[0], loaded.predict(obs)[0])
    assert loaded.predict(obs[0])[0].shape == (2,)
    assert len(loaded.buffer.model) == len(trained.buffer.model)
    assert torch.equal(loaded.model.elite_mask, trained.model.elite_mask)


def test_refuses_bad_envs_and_configs():
    with pytest.raises(ConfigError, match="continuous"):
        MBPO(gym.make("CartPole-v1"))
    with pytest.raises(ConfigError, match="no known task reward"):
        MBPO(gym.make("MountainCarContinuous-v0"))
    with pytest.raises(ConfigError, match="preset"):
        MBPO(make_env(POINT_MASS_ID), config="huge")
    with pytest.raises(ConfigError, match="real-ratio"):
        DynaConfig(real_ratio=0.0)
    with pytest.raises(ConfigError, match="rollout-schedule"):
        DynaConfig(rollout_schedule=(10, 5, 1, 2))
    with pytest.raises(ConfigError, match="updates-per-step"):
        DynaConfig(updates_per_step=0)


def test_sac_preset_uses_no_model():
    config = replace_fields(PRESETS["sac"], {"model.random_steps": 20, "mbpo.sac_hidden": (16,)})
    agent = MBPO(make_env(POINT_MASS_ID, seed=0), config=config).learn(50)
    assert not agent.model_trained and len(agent.buffer.model) == 0
    assert agent.sac._n_updates == 31


def test_rollout_length_schedule():
    schedule = (100, 300, 1, 5)
    lengths = [rollout_length(schedule, step) for step in (0, 100, 200, 299, 300, 10**6)]
    assert lengths == [1, 1, 3, 4, 5, 5]


def test_branched_rollouts_stop_terminated_rollouts():
    torch.manual_seed(0)
    model = GaussianEnsemble(4, 2, members=3, elites=2, hidden=(8,))
    starts = torch.randn(50, 2)
    generator = torch.Generator().manual_seed(0)

    def policy(obs):
        return torch.zeros(len(obs), 2)

    task = task_functions(POINT_MASS_ID)
    arrays, stats = branched_rollouts(model, policy, task, starts, 3, generator)
    assert len(arrays["rewards"]) == 150 and stats.terminated_share == 0.0
    assert stats.model_std > 0
    first = arrays["observations"][:50]
    assert np.array_equal(first, starts.numpy())
    assert np.array_equal(arrays["observations"][50:100], arrays["next_observations"][:50])

    def left_half(obs, action, next_obs):
        return next_obs[..., 0] < 0

    halted = TaskFunctions(task.reward, left_half)
    arrays, stats = branched_rollouts(model, policy, halted, starts, 3, generator)
    first_done = arrays["dones"][:50] > 0
    assert 0 < first_done.sum() < 50
    assert len(arrays["rewards"]) < 150
    assert np.array_equal(
        arrays["observations"][50 : 50 + (~first_done).sum()],
        arrays["next_observations"][:50][~first_done],
    )
    assert stats.terminated_share == arrays["dones"].sum() / 50
    assert never_terminated(starts, starts, starts).sum() == 0


def test_model_buffer_keeps_the_newest_rows():
    buffer = ModelBuffer(obs_dim=1, action_dim=1, capacity=5)

    def rows(values):
        values = np.asarray(values, dtype=np.float32)
        return {
            "observations": values[:, None],
            "actions": values[:, None],
            "rewards": values,
            "next_observations": values[:, None],
            "dones": np.zeros_like(values),
        }

    buffer.add(rows([1, 2, 3]))
    buffer.add(rows([4, 5, 6, 7]))
    assert len(buffer) == 5 and buffer.newest(5)["rewards"].tolist() == [3, 4, 5, 6, 7]
    buffer.resize(3)
    assert buffer.newest(3)["rewards"].tolist() == [5, 6, 7]
    buffer.add(rows(range(10, 20)))
    assert buffer.newest(3)["rewards"].tolist() == [17, 18, 19]
    buffer.resize(6)
    buffer.add(rows([20]))
    assert buffer.newest(6)["rewards"].tolist() == [17, 18, 19, 20]


def test_mixed_buffer_samples_the_real_ratio():
    space = gym.spaces.Box(-1, 1, (2,))
    buffer = MixedReplayBuffer(100, space, space, device="cpu", real_ratio=0.25, seed=0)
    for _ in range(10):
        buffer.add(np.zeros(2), np.zeros(2), np.zeros(2), np.float32(1.0), np.array(True), [{}])
    assert buffer.sample(8).rewards.sum() == 8  # no model data yet: all real
    buffer.model.resize(20)
    zeros = np.zeros((20, 2), np.float32)
    buffer.model.add(
        {
            "observations": zeros,
            "actions": zeros,
            "rewards": np.zeros(20, np.float32),
            "next_observations": zeros,
            "dones": np.zeros(20, np.float32),
        }
    )
    batch = buffer.sample(64)
    assert batch.rewards.shape == (64, 1) and batch.dones.shape == (64, 1)
    assert batch.rewards.sum() == 16 and batch.dones.sum() == 16  # real rows terminated


def test_train_resume_and_eval_commands(tmp_path):
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mbrl_bilevel.cli import main

    options = ["--env", POINT_MASS_ID, "--agent", "mbpo", "--preset", "tiny", "--steps", "150"]
    options += ["--eval-every", "100", "--eval-episodes", "1", "--out-dir", str(tmp_path)]
    main(["train", *options, "--name", "run", "--no-progress"])
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["env_steps"] == 150 and summary["episodes"] == 3
    assert summary["final_eval_return"] is not None and summary["seconds_per_env_step"] > 0
    (events,) = run.glob("events.out.tfevents.*")
    tags = set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    expected = {"mbpo/rollout_length", "mbpo/terminated_share", "mbpo/model_std"}
    expected |= {"model/val_nll", "train/critic_loss", "rollout/ep_return", "eval/mean_reward"}
    assert expected <= tags
    main(["eval", str(run), "--episodes", "1"])
    assert json.loads((run / "eval.json").read_text())["episodes"] == 1
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(config | {"steps": 250}))
    main(["train", "--resume", str(run), "--no-progress"])  # on to 250 steps from 150
    assert json.loads((run / "summary.json").read_text())["env_steps"] == 250
    evals = set()
    for events in run.glob("events.out.tfevents.*"):
        evals |= {
            e.step for e in EventAccumulator(str(events)).Reload().Scalars("eval/mean_reward")
        }
    assert evals == {100, 200}  # a resumed run evaluates at the steps of an uninterrupted one
    kept = np.load(run / "eval" / "evaluations.npz")  # and keeps the evaluations made before
    assert kept["timesteps"].tolist() == [100, 200] and kept["results"].shape == (2, 1)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *options, "--name", "bad", "--preset", "pets"])
    assert exit_info.value.code == 2


@pytest.mark.slow
def test_mbpo_learns_the_point_mass():
    """Random actions average about -41 per episode, steering straight to the origin about -2.1;
    the tiny preset reached -4.7 after 1500 steps (seed 0, 2-3 minutes on a loaded core)."""
    agent = MBPO(make_env(POINT_MASS_ID, seed=0), config="tiny", seed=0).learn(1500)
    env = make_env(POINT_MASS_ID, seed=123)
    total = 0.0
    for _ in range(10):
        obs, _ = env.reset()
        for _ in range(50):
            obs, reward, *_ = env.step(agent.predict(obs)[0])
            total += reward
    assert total / 10 > -10
