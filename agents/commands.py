"""`mbrl-bilevel train` and `mbrl-bilevel eval`: train an agent on a Gymnasium task into
runs/<name>/ (resumable from its checkpoints, one live run per folder), and evaluate a trained
run, optionally on video."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import tyro
from stable_baselines3.common.callbacks import EvalCallback
from stable_baselines3.common.monitor import Monitor

from agents.base import AgentConfig, ModelBasedAgent, ModelConfig
from agents.checkpoints import CHECKPOINT, EpisodeCheckpoint, load_newest, previous_path
from agents.mbpo import MBPO, DynaConfig
from agents.pets import PETS, PlannerConfig
from envs.make import make_env
from mbrl_bilevel.configs import check_positive_fields, env_name, from_dict
from mbrl_bilevel.learners import PGOptions, check_strategy, resolve_estimator
from mbrl_bilevel.reporting import plot_curves
from mbrl_bilevel.runs import (
    create_run_dir,
    remove_temporaries,
    run_lock,
    save_figure,
    write_csv,
    write_json,
)
from mbrl_bilevel.validation import ConfigError

AGENTS = {"pets": PETS, "mbpo": MBPO}


@dataclass(frozen=True)
class TrainConfig:
    """Train an agent on a Gymnasium continuous-control task. The option groups --model.*,
    --pg.*, --planner.* (PETS) and --mbpo.* (MBPO) start from the preset as it applies to the env
    (`--help` after --env, --agent and --preset shows those values) and change it field by
    field."""

    env: str = "InvertedPendulum-v5"
    """Gymnasium env id."""
    agent: str = "pets"
    """Agent: pets (MPC) or mbpo (Dyna on SB3's SAC)."""
    dynamics_loss: str = "bilevel"
    """Dynamics learner: mse, nll, nll-beta, pg (U = I), pg-scaled, pg-raw-sigma, pg-plugin,
    pg-plugin-input (the plug-in U(x) from a regression of the held-out residuals),
    pg-plugin-input-beta (the same, its terms weighted by σ̂²(x)^β as β-NLL weights NLL's, then
    its mean and variance heads refitted on the frozen trunk),
    bilevel (a diagonal reward U learned by implicit differentiation) or bilevel-input (U(x))."""
    steps: int = 1500
    """Total env steps."""
    preset: str = "auto"
    """Agent sizes, per env where the papers set them (docs: configuration): tiny (a small model
    and planner: minutes on a CPU, enough for InvertedPendulum and the point mass), cpu (sized
    for this machine's cores), the paper's settings (pets for pets, mbpo for mbpo), sac (mbpo
    without a model: plain SB3 SAC, the baseline), or auto (tiny for InvertedPendulum and the
    point mass, cpu for the other tasks)."""
    seed: int = 0
    """Seed of the agent and the env."""
    eval_every: int = 500
    """Evaluate every this many env steps."""
    eval_episodes: int = 3
    """Episodes per evaluation (deterministic policy)."""
    name: str | None = None
    """Run name; default <env>-<agent>-<loss>-s<seed>-<time>."""
    out_dir: str = "runs"
    """Parent folder of run folders."""
    resume: str | None = None
    """A run folder to continue from its last checkpoint, up to its own --steps (its saved config
    is used; other options are ignored)."""
    checkpoint_every: int = 1
    """Save the agent at the first episode end after this many env steps since the last save
    (1: after every episode)."""
    threads: int = 1
    """Torch threads (1 whenever runs share the machine)."""
    progress: bool = True
    """Show a progress bar (on a terminal)."""
    verbose: bool = False
    """Also print the toolkit's per-step log messages (e.g. the bilevel outer steps it skips),
    which always go to the run's log.txt."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The ensemble and its retraining."""
    pg: PGOptions = field(default_factory=PGOptions)
    """The PG dynamics losses: λ, samples, estimator, baseline, β, reward updates."""
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    """PETS only: the CEM/iCEM planner."""
    mbpo: DynaConfig = field(default_factory=DynaConfig)
    """MBPO only: rollouts, real-data ratio and SAC."""

    def __post_init__(self):
        if self.agent not in AGENTS:
            raise ConfigError(f"unknown agent {self.agent!r}; choose from {sorted(AGENTS)}")
        check_strategy(self.dynamics_loss)
        check_positive_fields(
            self, ("steps", "eval_every", "eval_episodes", "checkpoint_every", "threads")
        )
        foreign = FOREIGN_GROUP[self.agent]
        if getattr(self, foreign) != type(getattr(self, foreign))():
            raise ConfigError(f"--{foreign}.* options apply to {foreign_agent(foreign)} only")
        object.__setattr__(self, "preset", resolve_preset(self.preset, self.env))
        AGENTS[self.agent].preset(self.preset, self.env)  # an unknown preset

    def agent_config(self) -> AgentConfig:
        """The agent's config: the groups of its agent, the PG estimator resolved (so that a
        fresh agent and one resumed from config.json hold the same config)."""
        groups = {
            "model": self.model,
            "pg": self.resolved_pg(),
            AGENT_GROUP[self.agent]: getattr(self, AGENT_GROUP[self.agent]),
        }
        return AGENTS[self.agent].config_type(**groups)

    def resolved_pg(self) -> PGOptions:
        """--pg.* with the estimator "auto" replaced by the one the dynamics loss trains with."""
        estimator = resolve_estimator(self.dynamics_loss, self.pg.estimator)
        return dataclasses.replace(self.pg, estimator=estimator)

    def saved(self) -> dict:
        """What config.json records: every field resolved (the PG estimator too), without the
        other agent's group."""
        saved = {k: v for k, v in asdict(self).items() if k != FOREIGN_GROUP[self.agent]}
        return saved | {"pg": asdict(self.resolved_pg())}


AGENT_GROUP = {"pets": "planner", "mbpo": "mbpo"}
"""The option group of each agent's policy."""
FOREIGN_GROUP = {"pets": "mbpo", "mbpo": "planner"}


def foreign_agent(group: str) -> str:
    return next(agent for agent, own in AGENT_GROUP.items() if own == group)


SMALL_TASKS = ("InvertedPendulum", "PointMass")
"""Tasks the tiny preset learns in minutes: the auto preset's tiny ones."""


def resolve_preset(preset: str, env: str) -> str:
    """`preset`, or for "auto" the preset that fits `env`: tiny for SMALL_TASKS, else cpu."""
    if preset != "auto":
        return preset
    return "tiny" if env_name(env) in SMALL_TASKS else "cpu"


def train_defaults(args: list[str]) -> TrainConfig:
    """The TrainConfig whose groups hold the preset of the --env, --agent and --preset in `args`
    (or their defaults): the defaults that `args` are then parsed on top of."""
    parser = argparse.ArgumentParser(add_help=False)
    for field_name in ("env", "agent", "preset"):
        parser.add_argument(f"--{field_name}", default=getattr(TrainConfig, field_name))
    known, _ = parser.parse_known_args(args)
    if known.agent not in AGENTS:
        raise ConfigError(f"unknown agent {known.agent!r}; choose from {sorted(AGENTS)}")
    name = resolve_preset(known.preset, known.env)
    preset = AGENTS[known.agent].preset(name, known.env)
    group = AGENT_GROUP[known.agent]
    return TrainConfig(
        env=known.env,
        agent=known.agent,
        preset=name,
        model=preset.model,
        pg=preset.pg,
        **{group: getattr(preset, group)},
    )


class SeededEvalCallback(EvalCallback):
    """Stable-Baselines3's EvalCallback whose evaluation at env step t resets the evaluation env
    with the seed `seed + t`: each evaluation depends only on the agent and t, so a resumed run
    repeats the evaluations of the run it continues. Stable-Baselines3 writes its
    evaluations.npz in place, where a kill can tear it: here it writes a scratch file that then
    replaces `log_path`/evaluations.npz in one rename."""

    def __init__(self, eval_env, seed: int, log_path: str | Path, **kwargs):
        super().__init__(eval_env, log_path=str(log_path), **kwargs)
        self.seed = seed
        self.evaluations_path = Path(log_path) / "evaluations.npz"
        self.log_path = str(Path(log_path) / ".evaluations.partial")  # np.savez adds .npz

    def _on_step(self) -> bool:
        due = self.eval_freq > 0 and self.n_calls % self.eval_freq == 0
        if due:
            self.eval_env.seed(self.seed + self.n_calls)
        keep_going = super()._on_step()
        if due:
            os.replace(f"{self.log_path}.npz", self.evaluations_path)
        return keep_going

    def restore(self, up_to_step: int) -> None:
        """Continue from step `up_to_step` (a checkpoint's): evaluate at the steps an
        uninterrupted run does and keep the saved evaluations up to that step (later ones are
        made again)."""
        self.n_calls = up_to_step
        if not self.evaluations_path.is_file():
            return
        with np.load(self.evaluations_path) as saved:
            kept = saved["timesteps"] <= up_to_step
            self.evaluations_timesteps = saved["timesteps"][kept].tolist()
            self.evaluations_results = saved["results"][kept].tolist()
            self.evaluations_length = saved["ep_lengths"][kept].tolist()


def run_train(config: TrainConfig) -> None:
    """Train into a new run folder, or go on with config.resume's; the folder is locked while
    the run lives."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    config = resumed_config(config) if config.resume else config
    torch.set_num_threads(config.threads)
    env = make_env(config.env, seed=config.seed)  # a bad env id fails before any folder is made
    run_dir = Path(config.resume) if config.resume else new_run_dir(config)
    with run_lock(run_dir), run_log(run_dir / "log.txt", config.verbose):
        remove_temporaries(run_dir)
        train_in(run_dir, config, env)


@contextlib.contextmanager
def run_log(path: Path, verbose: bool):
    """While the run lives, the toolkit's log messages (logger "mbrl_bilevel", DEBUG and up) go
    to `path` and, when `verbose`, to the console; without it only warnings reach the console."""
    logger = logging.getLogger("mbrl_bilevel")
    handlers = [logging.FileHandler(path)] + ([logging.StreamHandler()] if verbose else [])
    handlers[0].setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    level = logger.level
    logger.setLevel(logging.DEBUG)
    for handler in handlers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(level)


def resumed_config(config: TrainConfig) -> TrainConfig:
    """The config saved in the run folder config.resume, with this call's resume, progress and
    verbose."""
    run_dir = Path(config.resume)
    if not (run_dir / "config.json").is_file():
        raise ConfigError(f"{run_dir} is not a run folder (no config.json)")
    saved = json.loads((run_dir / "config.json").read_text())
    this_call = {"resume": config.resume, "progress": config.progress, "verbose": config.verbose}
    return from_dict(TrainConfig, {**saved, **this_call})


def new_run_dir(config: TrainConfig) -> Path:
    """runs/<name>: config.name, else <env>-<agent>-<loss>-s<seed>-<date>-<time>."""
    name = config.name or (
        f"{config.env}-{config.agent}-{config.dynamics_loss}-s{config.seed}-"
        f"{time.strftime('%Y%m%d-%H%M%S')}"
    )
    return create_run_dir(config.out_dir, name, "")


def train_in(run_dir: Path, config: TrainConfig, env: gym.Env) -> None:
    """Train the agent of `run_dir` on `env` (from its newest usable checkpoint when resuming)
    up to config.steps, evaluating and checkpointing on the way, then write the run's
    outputs."""
    checkpoint = run_dir / CHECKPOINT
    if not config.resume and (checkpoint.is_file() or previous_path(checkpoint).is_file()):
        raise ConfigError(
            f"{run_dir} holds an interrupted run: continue it with --resume {run_dir}, "
            "or pass another --name"
        )
    write_json(run_dir / "config.json", config.saved() | {"resume": None})
    agent = resumed_agent(config, run_dir, env) if config.resume else None
    if agent is None:
        agent = AGENTS[config.agent](
            env,
            dynamics_loss=config.dynamics_loss,
            config=config.agent_config(),
            tensorboard_log=str(run_dir),
            seed=config.seed,
        )
    evaluation = SeededEvalCallback(
        Monitor(make_env(config.env, seed=config.seed + 1)),  # true episode returns in eval
        seed=config.seed + 1,
        n_eval_episodes=config.eval_episodes,
        eval_freq=config.eval_every,
        log_path=run_dir / "eval",
        verbose=0,
    )
    evaluation.restore(agent.num_timesteps)  # a resumed run evaluates at the same steps
    start, steps_before = time.perf_counter(), agent.num_timesteps
    agent.learn(
        config.steps,
        callback=[evaluation, EpisodeCheckpoint(checkpoint, config.checkpoint_every)],
        progress_bar=config.progress,
    )
    seconds_per_step = (time.perf_counter() - start) / max(agent.num_timesteps - steps_before, 1)
    agent.save(checkpoint, previous_path(checkpoint))
    _write_outputs(run_dir, agent, evaluation, seconds_per_step, config.seed)


def resumed_agent(config: TrainConfig, run_dir: Path, env: gym.Env) -> ModelBasedAgent | None:
    """The agent of the newest usable checkpoint of `run_dir` (None before the first one). A
    newest checkpoint passed over as unusable is renamed agent.pt.unusable, so that the next
    save does not keep it as the previous one."""
    checkpoint = run_dir / CHECKPOINT
    loaded = load_newest(AGENTS[config.agent], checkpoint, env, tensorboard_log=str(run_dir))
    if loaded is None:
        return None
    agent, used = loaded
    if used != checkpoint and checkpoint.exists():
        os.replace(checkpoint, checkpoint.with_name(f"{checkpoint.name}.unusable"))
    print(f"resumed at step {agent.num_timesteps} from {used}")
    return agent


def _write_outputs(
    run_dir: Path, agent, evaluation: EvalCallback, seconds_per_step: float, seed: int
):
    rows, steps = [], 0
    for episode, (ret, length) in enumerate(
        zip(agent.episode_returns, agent.episode_lengths, strict=True)
    ):
        steps += length
        rows.append(
            {"episode": episode, "step": steps, "return": ret, "run": "train", "seed": seed}
        )
    write_csv(run_dir / "metrics.csv", rows)
    if agent.model_log:
        write_csv(run_dir / "model.csv", agent.model_log)
    if rows:
        figure = plot_curves(rows, "step", ["return"], "run", titles=["episode return"])
        save_figure(figure, run_dir / "plots" / "returns.png")
    final_eval = (
        float(np.mean(evaluation.evaluations_results[-1]))
        if evaluation.evaluations_results
        else None
    )
    summary = {
        "command": "train",
        "run_dir": str(run_dir),
        "env_steps": agent.num_timesteps,
        "episodes": len(agent.episode_returns),
        "final_eval_return": final_eval,
        "last_episode_return": agent.episode_returns[-1] if rows else None,
        "seconds_per_env_step": seconds_per_step,
        "faults": agent.faults,
    }
    write_json(run_dir / "summary.json", summary)
    print(json.dumps(summary, indent=2))
    print(f"run folder: {run_dir}\nTensorBoard: tensorboard --logdir {run_dir}")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluate a trained run (its last checkpoint) and optionally record a video."""

    run: tyro.conf.Positional[str]
    """The run folder, runs/<name>."""
    episodes: int = 5
    """Evaluation episodes."""
    video: bool = False
    """Save plots/eval.gif of the first episode (MuJoCo renders headless with MUJOCO_GL=egl)."""
    seed: int = 1000
    """Seed of the evaluation env."""


def run_eval(config: EvalConfig) -> None:
    os.environ.setdefault("MUJOCO_GL", "egl")
    run_dir = Path(config.run)
    checkpoint = run_dir / CHECKPOINT
    if not (run_dir / "config.json").is_file():
        raise not_trained(run_dir)
    if config.episodes <= 0:
        raise ConfigError(f"--episodes must be > 0, got {config.episodes}")
    train_config = json.loads((run_dir / "config.json").read_text())
    env = make_env(train_config["env"], seed=config.seed)
    if config.video:
        if "rgb_array" not in env.metadata.get("render_modes", []):
            raise ConfigError(f"{train_config['env']} cannot render frames: drop --video")
        env = make_env(train_config["env"], seed=config.seed, render_mode="rgb_array")
    loaded = load_newest(AGENTS[train_config["agent"]], checkpoint, env)
    if loaded is None:
        raise not_trained(run_dir)
    agent = loaded[0]
    returns, frames = [], []
    for episode in range(config.episodes):
        obs, _ = env.reset(seed=config.seed + episode)
        agent.predict(obs, episode_start=np.array([True]))  # fresh plan, as at an episode start
        agent.reset_episode()
        total, done = 0.0, False
        while not done:
            if config.video and episode == 0:
                frames.append(env.render())
            action, _ = agent.predict(obs)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    result = {
        "episodes": config.episodes,
        "returns": returns,
        "mean_return": float(np.mean(returns)),
        "std_return": float(np.std(returns)),
    }
    if frames:
        import imageio.v2 as imageio

        path = run_dir / "plots" / "eval.gif"
        path.parent.mkdir(parents=True, exist_ok=True)
        imageio.mimsave(path, frames[::2], duration=1000 * 2 * env.unwrapped.dt, loop=0)
        result["video"] = str(path)
    write_json(run_dir / "eval.json", result)
    print(json.dumps(result, indent=2))


def not_trained(run_dir: Path) -> ConfigError:
    return ConfigError(f"{run_dir} has no config.json and {CHECKPOINT}: not a trained run")
