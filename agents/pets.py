"""PETS: model-predictive control with CEM/iCEM over a probabilistic ensemble (Chua et al. 2018),
with the ensemble retrained after every episode by any dynamics learner.

The Stable-Baselines3 surface: PETS(env, dynamics_loss=..., tensorboard_log=..., seed=...),
learn(total_timesteps, callback=None, progress_bar=False), predict(obs, deterministic=True),
save(path), PETS.load(path, env). SB3 callbacks (BaseCallback, EvalCallback, CheckpointCallback)
work with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from agents.base import AgentConfig, ModelBasedAgent, ModelConfig, Step, transitions_from_steps
from agents.planners import CEMConfig, CEMPlanner
from agents.propagation import PROPAGATIONS, TrajectoryEvaluator
from mbrl_bilevel.configs import check_positive_fields
from mbrl_bilevel.transitions import Transitions
from mbrl_bilevel.validation import ConfigError

PLAN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class PlannerConfig:
    """The CEM/iCEM planner and its trajectory sampling (`--planner.*`)."""

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
    plan_dtype: str = "float32"
    """Dtype of the model evaluations while planning: float32 or bfloat16 (fast only on CPUs
    with bf16 matmul units or a GPU; docs: the PETS record)."""

    def __post_init__(self):
        check_positive_fields(
            self, ("horizon", "population", "elites", "iterations", "particles"), "planner."
        )
        if self.elites > self.population:
            raise ConfigError(
                f"--planner.elites ({self.elites}) cannot exceed --planner.population "
                f"({self.population})"
            )
        if self.propagation not in PROPAGATIONS:
            raise ConfigError(
                f"unknown --planner.propagation {self.propagation!r}; choose from {PROPAGATIONS}"
            )
        if self.plan_dtype not in PLAN_DTYPES:
            raise ConfigError(
                f"unknown --planner.plan-dtype {self.plan_dtype!r}; choose from "
                f"{sorted(PLAN_DTYPES)}"
            )

    def cem_config(self) -> CEMConfig:
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


@dataclass(frozen=True)
class PETSConfig(AgentConfig):
    """Model, PG options and planner of a PETS agent."""

    planner: PlannerConfig = field(default_factory=PlannerConfig)
    """The CEM/iCEM planner."""


PRESETS = {
    "pets": PETSConfig(),  # the PETS paper's sizes (per env: ENV_PRESETS), for a GPU
    "tiny": PETSConfig(  # smoke tests and the point mass
        model=ModelConfig(
            members=5, elite_members=3, hidden=(64, 64), train_steps=1000, random_steps=50
        ),
        planner=PlannerConfig(
            horizon=10, population=100, elites=10, iterations=3, icem=True, particles=4
        ),
    ),
    "cpu": PETSConfig(  # sized for one core of this machine, every env alike
        model=ModelConfig(hidden=(200, 200, 200), train_steps=1000),
        planner=PlannerConfig(
            horizon=15, population=100, elites=10, iterations=3, icem=True, particles=5
        ),
    ),
}

ENV_PRESETS = {
    # Chua et al. 2018, github.com/kchua/handful-of-trials dmbrl/config/<env>.py (CEM: popsize,
    # num_elites, PLAN_HOR; 5 iterations everywhere)
    "pets": {
        "HalfCheetah": {"planner.horizon": 30, "planner.population": 500, "planner.elites": 50},
        "Pusher": {"planner.horizon": 25, "planner.population": 500, "planner.elites": 50},
        "Reacher": {"planner.horizon": 25, "planner.population": 400, "planner.elites": 40},
    },
}


class PETS(ModelBasedAgent):
    """A PETS agent on a continuous-action Gymnasium env. With known task functions (envs.tasks)
    it plans with the task's planning reward and termination; otherwise the ensemble also
    predicts the reward (targets [Δs, r]) and plans with its mean, without termination."""

    config_type = PETSConfig
    presets = PRESETS
    env_presets = ENV_PRESETS
    timing_key = "planner/ms_per_step"
    learns_reward = True

    def _setup(self) -> None:
        config = self.config.planner
        generator = torch.Generator().manual_seed(self.seed)
        self.planner = CEMPlanner(self.action_low, self.action_high, config.cem_config(), generator)
        self.evaluator = TrajectoryEvaluator(
            self.model,
            None if self.task is None else self.task.planning_reward,
            None if self.task is None else self.task.terminated,
            config.particles,
            config.propagation,
            generator,
            PLAN_DTYPES[config.plan_dtype],
        )
        self.data: Transitions | None = None

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = True):
        """Plan from `observation` [O] or [1, O]; returns (action, state) as SB3 does."""
        obs = np.asarray(observation, dtype=np.float32)
        batched = obs.ndim == 2
        if episode_start is not None and np.any(episode_start):
            self.planner.reset()
        action = self._act(obs[0] if batched else obs)
        return (action[None] if batched else action), state

    def reset_episode(self) -> None:
        self.planner.reset()

    def _act(self, obs: np.ndarray) -> np.ndarray:
        if not self.model_trained:
            return self.env.action_space.sample()
        self.evaluator.set_start(torch.as_tensor(obs))
        return self.planner.act(self.evaluator).numpy()

    def _after_episode(self, steps: list[Step]) -> None:
        """Add the episode to the data and retrain the model on all of it."""
        episode = transitions_from_steps(steps)
        self.data = episode if self.data is None else Transitions.concatenate([self.data, episode])
        if self.num_timesteps >= self.config.model.random_steps:
            self._train_model(self.data)

    def _extra_state(self) -> dict:
        return {"data": self.data, "planner_rng": self.planner.generator.get_state()}

    def _restore(self, state: dict) -> None:
        self.data = state["data"]
        self.planner.generator.set_state(state["planner_rng"])
