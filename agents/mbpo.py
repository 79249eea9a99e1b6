"""MBPO: Dyna with short branched model rollouts feeding Stable-Baselines3's SAC (Janner et al.
2019), the ensemble retrained every `train_every` env steps by any dynamics learner.

Every real step goes to SAC's replay buffer (a MixedReplayBuffer); after the random phase the
ensemble is retrained every `train_every` steps, every `rollout_every` steps `rollout_batch`
rollouts of the scheduled length start from real states and fill the model buffer, and SAC takes
`updates_per_step` gradient steps on batches with a `real_ratio` share of real transitions.
After every episode the critic is checked against the returns the rewards allow (a diverged
critic is counted in faults["critic_divergences"]; the run goes on).

The Stable-Baselines3 surface: MBPO(env, dynamics_loss=..., tensorboard_log=..., seed=...),
learn(total_timesteps, callback=None, progress_bar=False), predict(obs, deterministic=True),
save(path), MBPO.load(path, env).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from stable_baselines3 import SAC

from agents.base import AgentConfig, ModelBasedAgent, ModelConfig, Step
from agents.buffers import MixedReplayBuffer
from agents.rollouts import branched_rollouts, rollout_length
from mbrl_bilevel.configs import check_positive_fields
from mbrl_bilevel.validation import ConfigError

CRITIC_MARGIN = 10.0
"""A critic has diverged when some |Q| exceeds this many times max |r| / (1 - γ), the largest
discounted return the real rewards allow."""
CRITIC_ROWS = 1024
"""Newest real transitions the critic check evaluates Q on."""


@dataclass(frozen=True)
class DynaConfig:
    """The Dyna loop of MBPO and its SAC (`--mbpo.*`): retraining, rollouts, SAC updates."""

    train_every: int = 250
    """Env steps between model retrainings."""
    rollout_every: int = 250
    """Env steps between rollout rounds."""
    rollout_batch: int = 100_000
    """Rollouts (start states) per round."""
    rollout_schedule: tuple[int, int, int, int] = (20_000, 150_000, 1, 15)
    """Rollout length: (start step, end step, start length, end length), linear in between."""
    retain_rounds: int = 4
    """Rounds of rollouts the model buffer keeps."""
    real_ratio: float = 0.05
    """Share of real transitions in SAC's batches; 1 uses no model (plain SAC)."""
    updates_per_step: int = 20
    """SAC gradient steps per env step."""
    target_entropy: float | None = None
    """SAC's target entropy; none: Stable-Baselines3's 'auto', -(action dimensions)."""
    sac_batch_size: int = 256
    """SAC minibatch size."""
    sac_hidden: tuple[int, ...] = (256, 256)
    """Hidden widths of SAC's actor and critics."""
    sac_lr: float = 3e-4
    """SAC learning rate (actor, critics, entropy coefficient)."""
    gamma: float = 0.99
    """Discount."""
    tau: float = 0.005
    """Soft target-update rate."""
    buffer_size: int = 1_000_000
    """Real transitions SAC's replay buffer keeps."""

    def __post_init__(self):
        if not 0 < self.real_ratio <= 1:
            raise ConfigError(f"--mbpo.real-ratio must be in (0, 1], got {self.real_ratio}")
        check_positive_fields(
            self,
            (
                "train_every",
                "rollout_every",
                "rollout_batch",
                "retain_rounds",
                "updates_per_step",
                "sac_batch_size",
                "sac_hidden",
                "sac_lr",
                "buffer_size",
            ),
            "mbpo.",
        )
        if not (0 < self.gamma <= 1 and 0 < self.tau <= 1):
            raise ConfigError(
                f"--mbpo.gamma and --mbpo.tau must be in (0, 1], got {self.gamma}, {self.tau}"
            )
        start, end, low, high = self.rollout_schedule
        if not (0 <= start <= end and 1 <= low and 1 <= high):
            raise ConfigError(
                "--mbpo.rollout-schedule must be (start step <= end step, start length >= 1, "
                f"end length >= 1), got {self.rollout_schedule}"
            )


@dataclass(frozen=True)
class MBPOConfig(AgentConfig):
    """Model, PG options and Dyna/SAC settings of an MBPO agent."""

    mbpo: DynaConfig = field(default_factory=DynaConfig)
    """The Dyna loop and its SAC."""


PRESETS = {
    # the MBPO paper's settings (per env: ENV_PRESETS), for machines that can afford them
    "mbpo": MBPOConfig(model=ModelConfig(train_steps=5000, val_fraction=0.2, random_steps=5000)),
    "cpu": MBPOConfig(  # 15k Hopper steps in under an hour on one core of this machine
        model=ModelConfig(hidden=(200, 200, 200), train_steps=250, patience=5, random_steps=1000),
        mbpo=DynaConfig(rollout_batch=25_000, updates_per_step=10),
    ),
    "sac": MBPOConfig(  # no model: SB3's SAC with its default settings, the baseline
        model=ModelConfig(random_steps=100), mbpo=DynaConfig(real_ratio=1.0, updates_per_step=1)
    ),
    "tiny": MBPOConfig(  # smoke tests and the point mass
        model=ModelConfig(
            members=3, elite_members=2, hidden=(32, 32), train_steps=100, random_steps=100
        ),
        mbpo=DynaConfig(
            train_every=100,
            rollout_every=50,
            rollout_batch=200,
            rollout_schedule=(0, 300, 1, 3),
            retain_rounds=2,
            real_ratio=0.5,
            updates_per_step=2,
            sac_batch_size=64,
            sac_hidden=(64, 64),
            buffer_size=10_000,
        ),
    ),
}


def _paper_settings(updates: int, entropy: float, schedule: tuple[int, int, int, int]) -> dict:
    return {
        "mbpo.updates_per_step": updates,
        "mbpo.target_entropy": entropy,
        "mbpo.rollout_schedule": schedule,
    }


PAPER_ENV_SETTINGS = {
    # Janner et al. 2019, github.com/jannerm/mbpo examples/config/<env>/0.py: n_train_repeat,
    # target_entropy, rollout_schedule (epochs of 1000 steps; 250 for InvertedPendulum)
    "Hopper": _paper_settings(20, -1.0, (20_000, 150_000, 1, 15)),
    "HalfCheetah": _paper_settings(40, -3.0, (20_000, 150_000, 1, 1)),
    "Walker2d": _paper_settings(20, -3.0, (20_000, 150_000, 1, 1)),
    "Ant": _paper_settings(20, -4.0, (20_000, 100_000, 1, 25)),
    "InvertedPendulum": _paper_settings(10, -0.05, (250, 3_750, 1, 1)),
}
ENV_PRESETS = {
    "mbpo": PAPER_ENV_SETTINGS
    | {"InvertedPendulum": PAPER_ENV_SETTINGS["InvertedPendulum"] | {"model.random_steps": 500}},
    # the paper's per-env settings with half its SAC updates per step (this machine's budget)
    "cpu": {
        env: settings | {"mbpo.updates_per_step": settings["mbpo.updates_per_step"] // 2}
        for env, settings in PAPER_ENV_SETTINGS.items()
    },
}


class MBPO(ModelBasedAgent):
    """An MBPO agent on a continuous-action Gymnasium env with a known task reward and
    termination (envs.tasks)."""

    config_type = MBPOConfig
    presets = PRESETS
    env_presets = ENV_PRESETS
    timing_key = "mbpo/ms_per_action"

    def _setup(self) -> None:
        config = self.config.mbpo
        self.sac = SAC(
            "MlpPolicy",
            self._vec_env,
            learning_rate=config.sac_lr,
            buffer_size=config.buffer_size,
            learning_starts=self.config.model.random_steps,
            batch_size=config.sac_batch_size,
            tau=config.tau,
            gamma=config.gamma,
            gradient_steps=config.updates_per_step,
            replay_buffer_class=MixedReplayBuffer,
            replay_buffer_kwargs={"real_ratio": config.real_ratio, "seed": self.seed},
            policy_kwargs={"net_arch": list(config.sac_hidden)},
            target_entropy="auto" if config.target_entropy is None else config.target_entropy,
            seed=self.seed,
            device="cpu",
        )
        self.sac.set_logger(self.logger)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.faults["critic_divergences"] = 0

    @property
    def buffer(self) -> MixedReplayBuffer:
        return self.sac.replay_buffer

    @property
    def uses_model(self) -> bool:
        return self.config.mbpo.real_ratio < 1

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = True):
        """SAC's action for `observation` [O] or [N, O]; returns (action, state) as SB3 does."""
        return self.sac.predict(observation, state, episode_start, deterministic)

    def _act(self, obs: np.ndarray) -> np.ndarray:
        return self.sac.predict(obs, deterministic=False)[0]

    def _after_step(self, step: Step) -> None:
        """Store the step; after the random phase retrain, roll out and update SAC when due."""
        obs, action, reward, next_obs, terminated, _ = step
        scaled = self.sac.policy.scale_action(np.asarray(action))
        self.buffer.add(obs, next_obs, scaled, np.float32(reward), np.array(terminated), [{}])
        config = self.config.mbpo
        step_index = self.num_timesteps - self.config.model.random_steps
        if step_index < 0:
            return
        if self.uses_model and step_index % config.train_every == 0:
            self._train_model(self.buffer.real_transitions(self.sac.policy.unscale_action))
        if self.uses_model and self.model_trained and step_index % config.rollout_every == 0:
            self._rollout()
        self.sac.train(config.updates_per_step, config.sac_batch_size)

    def _after_episode(self, steps: list[Step]) -> None:
        if self.num_timesteps >= self.config.model.random_steps:  # SAC has been updated
            self._check_critic()

    def _check_critic(self) -> None:
        """Log max |Q| of both critics on the newest real transitions and its bound
        CRITIC_MARGIN · max |r| / (1 - γ) (max |r| over the real buffer); count a critic
        divergence when it is beyond the bound or not finite. Draws no random numbers."""
        size = self.buffer.real_size()
        rows = (self.buffer.pos - 1 - np.arange(min(size, CRITIC_ROWS))) % size
        obs = torch.as_tensor(self.buffer.observations[rows, 0], dtype=torch.float32)
        actions = torch.as_tensor(self.buffer.actions[rows, 0], dtype=torch.float32)
        with torch.no_grad():
            q_max = torch.cat(self.sac.critic(obs, actions), dim=1).abs().max().item()
        gamma, reward_max = self.config.mbpo.gamma, np.abs(self.buffer.rewards[:size, 0]).max()
        bound = CRITIC_MARGIN * float(reward_max) / (1 - gamma) if gamma < 1 else math.inf
        self.logger.record("train/q_abs_max", q_max)
        self.logger.record("train/q_bound", bound)
        if not q_max <= bound:
            self._fault(
                "critic_divergences", f"SAC's critic diverged: max |Q| {q_max:.4g} > {bound:.4g}"
            )

    def _policy(self, obs: torch.Tensor) -> torch.Tensor:
        """SAC's stochastic action in env units [B, A] for obs [B, O]."""
        scaled = self.sac.actor(obs, deterministic=False)
        return self.action_low + 0.5 * (scaled + 1) * (self.action_high - self.action_low)

    def _rollout(self) -> None:
        """One round of branched rollouts from random real states into the model buffer."""
        config, buffer = self.config.mbpo, self.buffer
        length = rollout_length(config.rollout_schedule, self.num_timesteps)
        rows = torch.randint(buffer.real_size(), (config.rollout_batch,), generator=self.generator)
        starts = torch.as_tensor(buffer.observations[rows.numpy(), 0], dtype=torch.float32)
        arrays, stats = branched_rollouts(
            self.model, self._policy, self.task, starts, length, self.generator
        )
        arrays["actions"] = self.sac.policy.scale_action(arrays["actions"])
        buffer.model.resize(config.retain_rounds * config.rollout_batch * length)
        buffer.model.add(arrays)
        self.logger.record("mbpo/rollout_length", length)
        self.logger.record("mbpo/terminated_share", stats.terminated_share)
        self.logger.record("mbpo/model_std", stats.model_std)
        self.logger.record("mbpo/model_transitions", len(buffer.model))

    def _extra_state(self) -> dict:
        sac = io.BytesIO()
        self.sac.save(sac)
        return {
            "sac": sac.getvalue(),
            "buffer": self.buffer.state(),
            "rollout_rng": self.generator.get_state(),
        }

    def _restore(self, state: dict) -> None:
        self.sac = SAC.load(io.BytesIO(state["sac"]), env=self._vec_env, device="cpu")
        self.sac.set_logger(self.logger)
        self.buffer.load_state(state["buffer"])
        self.generator.set_state(state["rollout_rng"])
