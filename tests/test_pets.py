"""PETS on the shipped point-mass task: it learns, it is deterministic, it saves and loads."""

import numpy as np
import pytest
from stable_baselines3.common.callbacks import BaseCallback

from agents.pets import PETS, PRESETS, PlannerConfig
from envs.make import make_env
from envs.point_mass import POINT_MASS_ID
from mbrl_bilevel.report.runs import read_csv
from mbrl_bilevel.validation import ConfigError

TINY = PRESETS["tiny"]


def train(seed=0, steps=200):
    agent = PETS(make_env(POINT_MASS_ID, seed=seed), dynamics_loss="nll", config=TINY, seed=seed)
    return agent.learn(steps)


@pytest.fixture(scope="module")
def trained():
    return train()


def test_pets_beats_random_actions_on_point_mass(trained):
    """Random actions average about -41 per episode (best of 50 starts: -7.3); steering straight
    to the origin scores about -2.1."""
    env = make_env(POINT_MASS_ID, seed=123)
    random_returns = []
    for _ in range(10):
        env.reset()
        random_returns.append(sum(env.step(env.action_space.sample())[1] for _ in range(50)))
    planned = trained.episode_returns[1:]  # the first episode is random exploration
    assert np.mean(planned[-2:]) > -7.0
    assert np.mean(planned[-2:]) > np.mean(random_returns) + 20


def test_same_seed_same_returns(trained):
    assert train(seed=0).episode_returns == trained.episode_returns


def test_save_load_predict_identical_actions(trained, tmp_path):
    trained.save(tmp_path / "agent.pt")
    loaded = PETS.load(tmp_path / "agent.pt", make_env(POINT_MASS_ID, seed=5))
    obs = np.array([0.7, -0.4], dtype=np.float32)
    for agent in (trained, loaded):
        agent.planner.reset()
        agent.planner.generator.manual_seed(11)
    first = trained.predict(obs)[0]
    second = loaded.predict(obs[None])[0]
    assert second.shape == (1, 2)
    assert np.array_equal(first, second[0])
    assert loaded.num_timesteps == trained.num_timesteps


def test_bfloat16_planning_ranks_candidates_like_float32(trained):
    """Same candidates, same particles and noise: only the dtype of the model evaluations differs."""
    import torch
    from scipy.stats import spearmanr

    from agents.propagation import TrajectoryEvaluator

    candidates = torch.rand(
        300, TINY.planner.horizon, 2, generator=torch.Generator().manual_seed(0)
    )
    returns = {}
    for dtype in (torch.float32, torch.bfloat16):
        evaluator = TrajectoryEvaluator(
            trained.model, trained.task.reward, None, TINY.planner.particles, dtype=dtype
        )
        evaluator.set_start(torch.tensor([0.8, -0.5]))
        returns[dtype] = evaluator(2 * candidates - 1)
    assert spearmanr(returns[torch.float32], returns[torch.bfloat16]).statistic > 0.99
    assert not torch.equal(returns[torch.float32], returns[torch.bfloat16])


def test_refuses_discrete_actions_and_bad_options():
    import gymnasium as gym

    with pytest.raises(ConfigError, match="continuous"):
        PETS(gym.make("CartPole-v1"))
    with pytest.raises(ConfigError, match="preset"):
        PETS(make_env(POINT_MASS_ID), config="huge")
    with pytest.raises(ConfigError, match="plan-dtype"):
        PlannerConfig(plan_dtype="float16")


def test_known_task_plans_with_its_reward_and_unknown_task_learns_one():
    import gymnasium as gym

    known = PETS(make_env(POINT_MASS_ID))
    assert known.model.out_dim == 2 and known.evaluator.reward is not None
    unknown = PETS(gym.make("MountainCarContinuous-v0"), config=TINY)
    assert unknown.model.out_dim == 3 and unknown.evaluator.reward is None
    assert unknown.evaluator.terminated is None


UNKNOWN_POINT_MASS = "mbrl_bilevel_test/PointMassNoTaskReward-v0"


def unknown_point_mass(seed=0):
    """The point mass under an id envs.tasks does not know: PETS must learn -||p'|| itself."""
    import gymnasium as gym

    from envs.tasks import task_functions

    if UNKNOWN_POINT_MASS not in gym.registry:
        gym.register(UNKNOWN_POINT_MASS, "envs.point_mass:PointMassEnv", max_episode_steps=50)
    assert task_functions(UNKNOWN_POINT_MASS) is None
    return make_env(UNKNOWN_POINT_MASS, seed=seed)


def test_learned_reward_head_trains_and_plans():
    import torch

    agent = PETS(unknown_point_mass(), config=TINY, seed=0).learn(100)
    assert agent.episode_lengths == [50, 50]  # one random episode, one planned
    data = agent.data.model_dataset(reward=True)
    predicted = agent.model(data.x).mean[agent.model.elite_mask].mean(0)[:, -1].detach()
    assert np.corrcoef(predicted, data.y[:, -1])[0, 1] > 0.9
    agent.evaluator.set_start(torch.zeros(2))
    assert torch.isfinite(agent.evaluator(torch.zeros(5, TINY.planner.horizon, 2))).all()


@pytest.mark.slow
def test_learned_reward_head_beats_random_actions():
    """Random actions average about -41; with the known reward PETS reaches about -3, with the
    learned one about -11 after 600 steps (its early plans exploit the young reward model)."""
    agent = PETS(unknown_point_mass(), config=TINY, seed=0).learn(600)
    assert np.mean(agent.episode_returns[-3:]) > -20.0


class KillAt(BaseCallback):
    """Simulates a crash: raises at env step `step`."""

    def __init__(self, step):
        super().__init__()
        self.step = step

    def _on_step(self):
        if self.num_timesteps >= self.step:
            raise KeyboardInterrupt
        return True


def test_killed_run_resumes_without_losing_finished_episodes(tmp_path, trained):
    from agents.commands import EpisodeCheckpoint

    path = tmp_path / "agent.pt"
    agent = PETS(make_env(POINT_MASS_ID, seed=0), dynamics_loss="nll", config=TINY, seed=0)
    with pytest.raises(KeyboardInterrupt):
        agent.learn(200, callback=[EpisodeCheckpoint(path), KillAt(125)])  # in episode 3
    resumed = PETS.load(path, make_env(POINT_MASS_ID, seed=0))
    assert resumed.num_timesteps == 100 and len(resumed.episode_returns) == 2
    assert resumed.episode_returns == trained.episode_returns[:2]
    resumed.learn(200)
    assert len(resumed.episode_returns) == 4 and resumed.num_timesteps == 200


def test_train_and_eval_commands_write_their_files(tmp_path, capsys):
    import json

    from mbrl_bilevel.cli import main

    train_args = [
        "train",
        "--env",
        POINT_MASS_ID,
        "--dynamics-loss",
        "nll",
        "--preset",
        "tiny",
        "--steps",
        "100",
        "--eval-every",
        "60",
        "--eval-episodes",
        "1",
        "--out-dir",
        str(tmp_path),
        "--name",
        "run",
        "--seed",
        "3",
        "--no-progress",
    ]
    main(train_args)
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["env_steps"] == 100 and summary["episodes"] == 2
    assert {row["seed"] for row in read_csv(run / "metrics.csv")} == {3.0}
    assert (run / "checkpoints" / "agent.pt").is_file() and (
        run / "plots" / "returns.png"
    ).is_file()
    assert list(run.glob("events.out.tfevents.*"))
    main(["eval", str(run), "--episodes", "1"])
    assert json.loads((run / "eval.json").read_text())["episodes"] == 1
    assert "run folder: " + str(run) in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(tmp_path / "missing")])
    assert exit_info.value.code == 2

    finished = (run / "summary.json").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(train_args)
    assert exit_info.value.code == 2 and "holds a finished run" in capsys.readouterr().err
    assert (run / "summary.json").read_bytes() == finished
    (run / "summary.json").unlink()  # as if killed after its last checkpoint
    with pytest.raises(SystemExit) as exit_info:
        main(train_args)
    assert exit_info.value.code == 2 and f"--resume {run}" in capsys.readouterr().err


def test_planner_options_reach_pets_and_are_refused_elsewhere(tmp_path, capsys):
    from agents.commands import TrainConfig
    from mbrl_bilevel.cli import main

    config = TrainConfig(preset="cpu", planner=PlannerConfig(plan_dtype="bfloat16"))
    assert config.agent_config().planner.plan_dtype == "bfloat16"
    for args, message in (
        (["--planner.plan-dtype", "float16"], "plan-dtype"),
        (["--agent", "mbpo", "--preset", "mbpo", "--planner.plan-dtype", "bfloat16"], "pets only"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "--out-dir", str(tmp_path), "--no-progress", *args])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
