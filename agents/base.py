"""What PETS and MBPO share: the checks on env and preset, the ensemble and its dynamics learner,
the Stable-Baselines3 surface (callbacks, logger, get_env), the episode loop, model retraining on
real transitions (a retraining that diverges is undone), and save/load of the common state
(weights, counters, RNG states) in a checkpoint verified by its SHA-256.

A subclass sets `config_type`, `presets` and `timing_key`, and fills in `_setup` (its policy),
`_act` (the policy after the random phase), `predict`, and the hooks `_after_step`,
`_after_episode`, `_extra_state`, `_restore`.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, ConvertCallback
from stable_baselines3.common.logger import configure
from stable_baselines3.common.vec_env import DummyVecEnv
from tqdm.auto import tqdm

from agents.checkpoints import checkpoint_bytes, read_checkpoint
from envs.tasks import task_functions
from mbrl_bilevel.configs import check_positive_fields, env_name, from_dict, replace_fields
from mbrl_bilevel.data import random_split
from mbrl_bilevel.ensemble import GaussianEnsemble
from mbrl_bilevel.learners import PGOptions, make_dynamics_learner
from mbrl_bilevel.runs import atomic_write_bytes
from mbrl_bilevel.training import FitConfig, heldout_metrics
from mbrl_bilevel.transitions import Transitions
from mbrl_bilevel.validation import ConfigError

KNOWN = "the MuJoCo v5 tasks of envs.tasks and mbrl_bilevel/PointMass-v0"


@dataclass(frozen=True)
class ModelConfig:
    """The ensemble and its retraining (`--model.*`)."""

    members: int = 7
    """Ensemble members E."""
    elite_members: int = 5
    """Members the policy uses (planning or rollouts), chosen on validation."""
    hidden: tuple[int, ...] = (200, 200, 200, 200)
    """Hidden widths of each member."""
    train_steps: int = 2000
    """Gradient steps per retraining at most (early stopping may end it sooner)."""
    batch_size: int = 256
    """Minibatch size of model training."""
    lr: float = 1e-3
    """Adam learning rate of model training."""
    patience: int = 10
    """Validations (every 50 steps) without improvement before training stops."""
    val_fraction: float = 0.1
    """Share of the real data held out for early stopping and elites."""
    random_steps: int = 200
    """Env steps with random actions before the first model training and policy update."""

    def __post_init__(self):
        check_positive_fields(
            self,
            ("members", "elite_members", "hidden", "train_steps", "batch_size", "lr", "patience"),
            "model.",
        )
        if self.elite_members > self.members:
            raise ConfigError(
                f"--model.elite-members ({self.elite_members}) cannot exceed --model.members "
                f"({self.members})"
            )
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"--model.val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.random_steps < 1:
            raise ConfigError(f"--model.random-steps must be >= 1, got {self.random_steps}")

    def fit_config(self) -> FitConfig:
        return FitConfig(
            steps=self.train_steps,
            lr=self.lr,
            batch_size=self.batch_size,
            eval_every=50,
            patience=self.patience,
        )


@dataclass(frozen=True)
class AgentConfig:
    """What every agent's config holds: its model and the PG options of its dynamics learner;
    each agent adds the group of its policy."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The ensemble and its retraining."""
    pg: PGOptions = field(default_factory=PGOptions)
    """How the PG dynamics losses train and adapt their reward (ignored by mse, nll, nll-beta
    but for pg.beta of nll-beta)."""


# One env step: (obs [O], action [A], reward, next_obs [O], terminated, truncated).
Step = tuple[np.ndarray, np.ndarray, float, np.ndarray, bool, bool]


class ModelBasedAgent:
    """An agent with a GaussianEnsemble dynamics model on a continuous-action Gymnasium env with a
    known task reward (envs.tasks). `config` is a preset name (resolved for the env by `preset`)
    or a `config_type` instance."""

    config_type: ClassVar[type[AgentConfig]]
    presets: ClassVar[dict[str, AgentConfig]]
    env_presets: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {}
    """Per-env changes of a preset, {preset: {env name (the id without its version): {dotted
    field: value}}}, as the agent's papers set them (docs: the presets table)."""
    timing_key: ClassVar[str]
    """Scalar name of the mean time the policy takes per action, in ms."""
    learns_reward: ClassVar[bool] = False
    """Whether the agent works on envs without task functions: the ensemble then also predicts
    the reward (targets [Δs, r])."""

    def __init__(
        self,
        env: gym.Env,
        dynamics_loss: str = "nll",
        config: AgentConfig | str = "cpu",
        tensorboard_log: str | None = None,
        seed: int = 0,
        verbose: int = 0,
    ):
        name = type(self).__name__
        if not isinstance(env.action_space, gym.spaces.Box):
            raise ConfigError(
                f"{name} needs a continuous (Box) action space, got {env.action_space}"
            )
        env_id = env.spec.id if env.spec else type(env).__name__
        if isinstance(config, str):
            config = self.preset(config, env_id)
        self.task = task_functions(env_id)
        if self.task is None and not self.learns_reward:
            raise ConfigError(f"no known task reward for {env_id!r}; {name} supports {KNOWN}")
        self.env, self.dynamics_loss, self.config, self.seed = env, dynamics_loss, config, seed
        self.tensorboard_log, self.verbose = tensorboard_log, verbose
        torch.manual_seed(seed)
        obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
        out_dim = obs_dim + (self.task is None)
        model = config.model
        self.model = GaussianEnsemble(
            obs_dim + act_dim, out_dim, model.members, model.elite_members, model.hidden
        )
        self.learner = make_dynamics_learner(
            dynamics_loss,
            model.fit_config(),
            obs_dim + act_dim,
            out_dim,
            seed=seed,
            options=config.pg,
        )
        self.action_low = torch.as_tensor(env.action_space.low, dtype=torch.float32)
        self.action_high = torch.as_tensor(env.action_space.high, dtype=torch.float32)
        self.rng = np.random.default_rng(seed)
        env.action_space.seed(seed)
        self.num_timesteps = 0
        self.episode_returns: list[float] = []
        self.episode_lengths: list[int] = []
        self.model_trained = False
        self.model_log: list[dict[str, float]] = []
        """One row per retraining: step, val_rmse, val_nll (the elite mixture on the held-out
        split, Δ-state units, NLL per dimension)."""
        self.faults: dict[str, int] = {"model_divergences": 0}
        """How often each guarded fault happened (a subclass adds its own keys)."""
        self.logger = configure(tensorboard_log, ["tensorboard"] if tensorboard_log else [])
        self._vec_env = DummyVecEnv([lambda: env])
        self._setup()

    @classmethod
    def preset(cls, name: str, env_id: str) -> AgentConfig:
        """The preset `name` as it applies to `env_id` (its env_presets changes made)."""
        if name not in cls.presets:
            raise ConfigError(
                f"unknown preset {name!r} for {cls.__name__}; choose from {sorted(cls.presets)}"
            )
        changes = cls.env_presets.get(name, {}).get(env_name(env_id), {})
        return replace_fields(cls.presets[name], changes)

    # ----------------------------------------------------------------- SB3 surface

    def get_env(self) -> DummyVecEnv:
        return self._vec_env

    def get_vec_normalize_env(self):
        return None

    def reset_episode(self) -> None:
        """Forget per-episode policy state (a planner's warm start); nothing by default."""

    def learn(self, total_timesteps: int, callback=None, progress_bar: bool = False):
        """Run episodes until `total_timesteps` env steps (counting steps done before a resume)."""
        callback = self._init_callback(callback)
        callback.on_training_start(locals(), globals())
        bar = tqdm(
            total=total_timesteps,
            initial=self.num_timesteps,
            disable=not progress_bar,
            desc=type(self).__name__,
        )
        keep_going = True
        while keep_going and self.num_timesteps < total_timesteps:
            keep_going = self._run_episode(callback, bar, total_timesteps)
        bar.close()
        callback.on_training_end()
        return self

    def save(self, path: str | Path, previous: str | Path | None = None) -> None:
        """Write config, model weights, counters, RNG states and the subclass's state to one file,
        atomically, behind a SHA-256 header (checkpoints.CHECKPOINT_FORMAT); with `previous`, the
        file it replaces is kept there."""
        atomic_write_bytes(path, checkpoint_bytes(self._state()), previous)

    @classmethod
    def load(cls, path: str | Path, env: gym.Env, **kwargs):
        """The agent saved at `path` (format 1 or 2) on `env`; CheckedFileError if the file is
        missing, torn, altered or of another format."""
        state = read_checkpoint(path)
        config = from_dict(cls.config_type, state["config"])
        agent = cls(env, state["dynamics_loss"], config, seed=state["seed"], **kwargs)
        agent.model.load_state_dict(state["model"])
        agent.num_timesteps, agent.model_trained = state["num_timesteps"], state["model_trained"]
        agent.episode_returns = state["episode_returns"]
        agent.episode_lengths = state["episode_lengths"]
        agent.model_log = state["model_log"]
        agent.faults |= state.get("faults", {})  # format 1 has no fault counters
        agent.learner.load_state_dict(state["learner"])
        agent._restore(state)
        torch.set_rng_state(state["torch_rng"])
        agent.rng.bit_generator.state = state["numpy_rng"]
        if "action_space_rng" in state:  # checkpoints written before it was saved lack it
            env.action_space.np_random.bit_generator.state = state["action_space_rng"]
        return agent

    def _state(self) -> dict[str, Any]:
        """Everything `load` restores."""
        return {
            "config": dataclasses.asdict(self.config),
            "dynamics_loss": self.dynamics_loss,
            "seed": self.seed,
            "model": self.model.state_dict(),
            "num_timesteps": self.num_timesteps,
            "episode_returns": self.episode_returns,
            "episode_lengths": self.episode_lengths,
            "model_trained": self.model_trained,
            "model_log": self.model_log,
            "faults": self.faults,
            "learner": self.learner.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": self.rng.bit_generator.state,
            "action_space_rng": self.env.action_space.np_random.bit_generator.state,
        } | self._extra_state()

    # ----------------------------------------------------------------- subclass hooks

    def _setup(self) -> None:
        """Build the policy (planner, SAC) once the common parts exist."""
        raise NotImplementedError

    def _act(self, obs: np.ndarray) -> np.ndarray:
        """The action [A] in `obs` [O] after the random phase."""
        raise NotImplementedError

    def _after_step(self, step: Step) -> None:
        """Called after every real env step (num_timesteps already counts it)."""

    def _after_episode(self, steps: list[Step]) -> None:
        """Called after every finished (or cut) episode, before the logger is dumped."""

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _restore(self, state: dict[str, Any]) -> None:
        """Restore the subclass's part of `state` (written by _extra_state)."""

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

    def _run_episode(self, callback: BaseCallback, bar, total_timesteps: int) -> bool:
        """One episode in the real env; False when a callback asks to stop."""
        obs, _ = self.env.reset(seed=int(self.rng.integers(2**31)))
        self.reset_episode()
        callback.on_rollout_start()
        steps: list[Step] = []
        episode_return, act_seconds, keep_going = 0.0, 0.0, True
        episode_start = time.perf_counter()
        while True:
            start = time.perf_counter()
            random_phase = self.num_timesteps < self.config.model.random_steps
            action = self.env.action_space.sample() if random_phase else self._act(obs)
            act_seconds += time.perf_counter() - start
            next_obs, reward, terminated, truncated, info = self.env.step(action)
            steps.append((obs, action, reward, next_obs, terminated, truncated))
            episode_return += float(reward)
            self.num_timesteps += 1
            self._after_step(steps[-1])
            bar.update(1)
            callback.update_locals(locals())
            if not callback.on_step():
                keep_going = False
            obs = next_obs
            if terminated or truncated or not keep_going or self.num_timesteps >= total_timesteps:
                break
        self.episode_returns.append(episode_return)
        self.episode_lengths.append(len(steps))
        bar.set_postfix({"episode": len(self.episode_returns), "return": f"{episode_return:.1f}"})
        self.logger.record("rollout/ep_return", episode_return)
        self.logger.record("rollout/ep_len", len(steps))
        self.logger.record(self.timing_key, 1e3 * act_seconds / len(steps))
        self._after_episode(steps)
        seconds = time.perf_counter() - episode_start
        self.logger.record("time/ms_per_step", 1e3 * seconds / len(steps))
        self.logger.dump(self.num_timesteps)
        callback.on_rollout_end()  # an episode is a rollout: checkpoints are taken here
        if self.verbose:
            print(f"step {self.num_timesteps}: episode return {episode_return:.1f}")
        return keep_going

    def _train_model(self, data: Transitions) -> None:
        """Retrain the ensemble on Δ-state targets of `data`, with a random validation split; log
        the elite mixture's held-out RMSE and NLL per dimension (in Δ-state units) to model_log.
        A retraining whose loss or weights become non-finite is undone (model and learner as they
        were before it) and counted in faults["model_divergences"]."""
        dataset = data.model_dataset(delta=True, reward=self.task is None)
        generator = torch.Generator().manual_seed(self.seed + self.num_timesteps)
        fraction = self.config.model.val_fraction
        train, val = random_split(dataset, [1 - fraction, fraction], generator)
        before = copy.deepcopy((self.model.state_dict(), self.learner.state_dict()))
        try:
            metrics = self.learner.fit(self.model, train, val)
            check_finite_weights(self.model)
        except FloatingPointError as error:
            self.model.load_state_dict(before[0])
            self.learner.load_state_dict(before[1])
            self._fault("model_divergences", f"model training diverged ({error}); undone")
            return
        with torch.no_grad():
            quality = heldout_metrics(self.model.mixture(val.x), val.y)
        self.model_log.append(
            {"step": self.num_timesteps, "val_rmse": quality["rmse"], "val_nll": quality["nll"]}
        )
        for key, value in metrics.items():
            self.logger.record(f"model/{key.replace('/', '_')}", value)
        self.logger.record("model/heldout_rmse", quality["rmse"])
        self.logger.record("model/heldout_nll_per_dim", quality["nll"])
        self.model_trained = True

    def _fault(self, key: str, message: str) -> None:
        """Count a fault the run survives: faults[key] += 1, the TensorBoard scalar faults/<key>,
        and, the first time, one line on stderr."""
        self.faults[key] += 1
        self.logger.record(f"faults/{key}", self.faults[key])
        if self.faults[key] == 1:
            tqdm.write(
                f"warning: step {self.num_timesteps}: {message} (summary.json counts {key})",
                file=sys.stderr,
            )


def check_finite_weights(model: torch.nn.Module) -> None:
    """Raise FloatingPointError naming the parameters and buffers of `model` that hold NaN or
    inf."""
    bad = [
        name
        for name, tensor in model.state_dict().items()
        if tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]
    if bad:
        raise FloatingPointError(f"non-finite weights after training: {', '.join(bad)}")


def transitions_from_steps(steps: list[Step]) -> Transitions:
    """The Transitions of a list of env steps."""
    columns = [np.asarray(c) for c in zip(*steps, strict=True)]
    return Transitions(
        columns[0].astype(np.float32),
        columns[1].astype(np.float32),
        columns[2].astype(np.float32),
        columns[3].astype(np.float32),
        columns[4].astype(bool),
        columns[5].astype(bool),
    )
