"""PETS: model-predictive control with CEM/iCEM over a probabilistic ensemble (Chua et al. 2018),
with the ensemble retrained after every episode by any dynamics learner.

The Stable-Baselines3 surface: PETS(env, dynamics_loss=..., tensorboard_log=..., seed=...),
learn(total_timesteps, callback=None, progress_bar=False), predict(obs, deterministic=True),
save(path), PETS.load(path, env). SB3 callbacks (BaseCallback, EvalCallback, CheckpointCallback)
work with it.
"""

from __future__ import annotations

import dataclasses
import io
import time
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, ConvertCallback
from stable_baselines3.common.logger import configure
from stable_baselines3.common.vec_env import DummyVecEnv
from tqdm.auto import tqdm

from agents.planners import CEMConfig, CEMPlanner
from agents.propagation import TrajectoryEvaluator
from envs.tasks import task_functions
from mbrl_bilevel.data import random_split
from mbrl_bilevel.ensemble import GaussianEnsemble
from mbrl_bilevel.learners import make_dynamics_learner
from mbrl_bilevel.runs import atomic_write_bytes
from mbrl_bilevel.training import FitConfig
from mbrl_bilevel.transitions import Transitions
from mbrl_bilevel.validation import ConfigError

PLAN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class PETSConfig:
    """Planner, model and training sizes of a PETS agent."""

    horizon: int = 30
    """Planning horizon H."""
    population: int = 500
    """CEM candidates per iteration."""
    elites: int = 50
    """CEM elites."""
    iterations: int = 5
    """CEM iterations per env step."""
    icem: bool = False
    """Use iCEM (coloured noise β = 2, elite reuse 30%, population decay 1.25)."""
    particles: int = 20
    """Particles per candidate."""
    propagation: str = "tsinf"
    """ts1, tsinf or expectation."""
    members: int = 7
    """Ensemble members E."""
    elite_members: int = 5
    """Members used for planning, chosen on validation."""
    hidden: tuple[int, ...] = (200, 200, 200, 200)
    """Hidden widths of each member."""
    train_steps: int = 2000
    """Gradient steps per retraining (early stopping may end it sooner)."""
    batch_size: int = 256
    """Minibatch size of model training."""
    lr: float = 1e-3
    """Adam learning rate of model training."""
    patience: int = 10
    """Validations (every 50 steps) without improvement before training stops."""
    val_fraction: float = 0.1
    """Share of the data held out for early stopping and elites."""
    random_steps: int = 200
    """Env steps with random actions before the first model is trained."""
    plan_dtype: str = "float32"
    """Dtype of the model evaluations while planning: float32 or bfloat16 (fast only on CPUs
    with bf16 matmul units; docs/pets.md)."""

    def __post_init__(self):
        if self.plan_dtype not in PLAN_DTYPES:
            raise ConfigError(
                f"unknown plan_dtype {self.plan_dtype!r}; choose from {sorted(PLAN_DTYPES)}"
            )

    def planner_config(self) -> CEMConfig:
        icem = (
            {"noise_beta": 2.0, "keep_elites": 0.3, "population_decay": 1.25} if self.icem else {}
        )
        return CEMConfig(
            horizon=self.horizon,
            population=self.population,
            elites=self.elites,
            iterations=self.iterations,
            **icem,
        )

    def fit_config(self) -> FitConfig:
        return FitConfig(
            steps=self.train_steps,
            lr=self.lr,
            batch_size=self.batch_size,
            eval_every=50,
            patience=self.patience,
        )


PRESETS = {
    "pets": PETSConfig(),  # the PETS paper's sizes, for machines that can afford them
    "tiny": PETSConfig(  # smoke tests and the point mass
        horizon=10,
        population=100,
        elites=10,
        iterations=3,
        icem=True,
        particles=4,
        members=5,
        elite_members=3,
        hidden=(64, 64),
        train_steps=200,
        random_steps=50,
    ),
    "cpu": PETSConfig(
        horizon=15,
        population=100,
        elites=10,
        iterations=3,
        icem=True,
        particles=5,
        hidden=(200, 200, 200),
        train_steps=1000,
    ),
}


class PETS:
    """A PETS agent on a continuous-action Gymnasium env. With a known task reward (envs.tasks)
    it plans with it and the task's termination; otherwise the ensemble also predicts the reward
    (targets [Δs, r]) and plans with its mean, without termination."""

    def __init__(
        self,
        env: gym.Env,
        dynamics_loss: str = "nll",
        config: PETSConfig | str = "cpu",
        tensorboard_log: str | None = None,
        seed: int = 0,
        verbose: int = 0,
    ):
        if not isinstance(env.action_space, gym.spaces.Box):
            raise ConfigError(f"PETS needs a continuous (Box) action space, got {env.action_space}")
        if isinstance(config, str):
            if config not in PRESETS:
                raise ConfigError(f"unknown preset {config!r}; choose from {sorted(PRESETS)}")
            config = PRESETS[config]
        env_id = env.spec.id if env.spec else type(env).__name__
        self.task = task_functions(env_id)
        self.env, self.dynamics_loss, self.config, self.seed = env, dynamics_loss, config, seed
        self.tensorboard_log, self.verbose = tensorboard_log, verbose
        torch.manual_seed(seed)
        obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
        learned_reward = self.task is None
        self.model = GaussianEnsemble(
            obs_dim + act_dim,
            obs_dim + learned_reward,
            config.members,
            config.elite_members,
            config.hidden,
        )
        self.learner = make_dynamics_learner(dynamics_loss, config.fit_config(), seed=seed)
        low = torch.as_tensor(env.action_space.low, dtype=torch.float32)
        high = torch.as_tensor(env.action_space.high, dtype=torch.float32)
        generator = torch.Generator().manual_seed(seed)
        self.planner = CEMPlanner(low, high, config.planner_config(), generator)
        self.evaluator = TrajectoryEvaluator(
            self.model,
            None if learned_reward else self.task.reward,
            None if learned_reward else self.task.terminated,
            config.particles,
            config.propagation,
            generator,
            PLAN_DTYPES[config.plan_dtype],
        )
        self.rng = np.random.default_rng(seed)
        env.action_space.seed(seed)
        self.data: Transitions | None = None
        self.num_timesteps = 0
        self.episode_returns: list[float] = []
        self.episode_lengths: list[int] = []
        self.model_trained = False
        self.logger = configure(tensorboard_log, ["tensorboard"] if tensorboard_log else [])
        self._vec_env = DummyVecEnv([lambda: env])

    # ----------------------------------------------------------------- SB3 surface

    def get_env(self) -> DummyVecEnv:
        return self._vec_env

    def get_vec_normalize_env(self):
        return None

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = True):
        """Plan from `observation` [O] or [1, O]; returns (action, state) as SB3 does."""
        obs = np.asarray(observation, dtype=np.float32)
        batched = obs.ndim == 2
        if episode_start is not None and np.any(episode_start):
            self.planner.reset()
        action = self._act(obs[0] if batched else obs)
        return (action[None] if batched else action), state

    def learn(self, total_timesteps: int, callback=None, progress_bar: bool = False) -> PETS:
        """Run episodes until `total_timesteps` env steps (counting steps done before a resume)."""
        callback = self._init_callback(callback)
        callback.on_training_start(locals(), globals())
        bar = tqdm(
            total=total_timesteps, initial=self.num_timesteps, disable=not progress_bar, desc="PETS"
        )
        keep_going = True
        while keep_going and self.num_timesteps < total_timesteps:
            keep_going = self._run_episode(callback, bar, total_timesteps)
        bar.close()
        callback.on_training_end()
        return self

    def save(self, path: str | Path) -> None:
        """Write config, model weights, data and counters to one file, atomically."""
        state = {
            "config": dataclasses.asdict(self.config),
            "dynamics_loss": self.dynamics_loss,
            "seed": self.seed,
            "model": self.model.state_dict(),
            "data": self.data,
            "num_timesteps": self.num_timesteps,
            "episode_returns": self.episode_returns,
            "episode_lengths": self.episode_lengths,
            "model_trained": self.model_trained,
            "learner_step": self.learner.global_step,
            "torch_rng": torch.get_rng_state(),
            "planner_rng": self.planner.generator.get_state(),
            "numpy_rng": self.rng.bit_generator.state,
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | Path, env: gym.Env, **kwargs) -> PETS:
        if not Path(path).is_file():
            raise ConfigError(f"no saved agent at {path}")
        state = torch.load(path, weights_only=False)
        config = PETSConfig(**{**state["config"], "hidden": tuple(state["config"]["hidden"])})
        agent = cls(env, state["dynamics_loss"], config, seed=state["seed"], **kwargs)
        agent.model.load_state_dict(state["model"])
        agent.data, agent.num_timesteps = state["data"], state["num_timesteps"]
        agent.episode_returns, agent.model_trained = (
            state["episode_returns"],
            state["model_trained"],
        )
        agent.episode_lengths = state["episode_lengths"]
        agent.learner.global_step = state["learner_step"]
        torch.set_rng_state(state["torch_rng"])
        agent.planner.generator.set_state(state["planner_rng"])
        agent.rng.bit_generator.state = state["numpy_rng"]
        return agent

    # ----------------------------------------------------------------- internals

    def _init_callback(self, callback) -> BaseCallback:
        if callback is None:
            callback = CallbackList([])
        elif isinstance(callback, list):
            callback = CallbackList(callback)
        elif not isinstance(callback, BaseCallback):
            callback = ConvertCallback(callback)
        callback.init_callback(self)
        return callback

    def _act(self, obs: np.ndarray) -> np.ndarray:
        if not self.model_trained:
            return self.env.action_space.sample()
        self.evaluator.set_start(torch.as_tensor(obs))
        return self.planner.act(self.evaluator).numpy()

    def _run_episode(self, callback: BaseCallback, bar, total_timesteps: int) -> bool:
        """One episode in the real env, then a retraining; False when a callback asks to stop."""
        obs, _ = self.env.reset(seed=int(self.rng.integers(2**31)))
        self.planner.reset()
        callback.on_rollout_start()
        rows, episode_return, plan_seconds, keep_going = [], 0.0, 0.0, True
        while True:
            start = time.perf_counter()
            random_phase = self.num_timesteps < self.config.random_steps
            action = self.env.action_space.sample() if random_phase else self._act(obs)
            plan_seconds += time.perf_counter() - start
            next_obs, reward, terminated, truncated, info = self.env.step(action)
            rows.append((obs, action, reward, next_obs, terminated, truncated))
            episode_return += float(reward)
            self.num_timesteps += 1
            bar.update(1)
            callback.update_locals(locals())
            if not callback.on_step():
                keep_going = False
            obs = next_obs
            if terminated or truncated or not keep_going or self.num_timesteps >= total_timesteps:
                break
        self._add_episode(rows)
        self.episode_returns.append(episode_return)
        self.episode_lengths.append(len(rows))
        bar.set_postfix({"episode": len(self.episode_returns), "return": f"{episode_return:.1f}"})
        self.logger.record("rollout/ep_return", episode_return)
        self.logger.record("rollout/ep_len", len(rows))
        self.logger.record("planner/ms_per_step", 1e3 * plan_seconds / len(rows))
        if self.num_timesteps >= self.config.random_steps:
            self._train_model()
        self.logger.dump(self.num_timesteps)
        callback.on_rollout_end()  # an episode is a rollout: checkpoints are taken here
        if self.verbose:
            print(f"step {self.num_timesteps}: episode return {episode_return:.1f}")
        return keep_going

    def _add_episode(self, rows) -> None:
        columns = [np.asarray(c) for c in zip(*rows, strict=True)]
        episode = Transitions(
            columns[0].astype(np.float32),
            columns[1].astype(np.float32),
            columns[2].astype(np.float32),
            columns[3].astype(np.float32),
            columns[4].astype(bool),
            columns[5].astype(bool),
        )
        self.data = episode if self.data is None else Transitions.concatenate([self.data, episode])

    def _train_model(self) -> None:
        dataset = self.data.model_dataset(delta=True, reward=self.task is None)
        generator = torch.Generator().manual_seed(self.seed + self.num_timesteps)
        fraction = self.config.val_fraction
        train, val = random_split(dataset, [1 - fraction, fraction], generator)
        metrics = self.learner.fit(self.model, train, val)
        for key, value in metrics.items():
            self.logger.record(f"model/{key.replace('/', '_')}", value)
        self.model_trained = True
