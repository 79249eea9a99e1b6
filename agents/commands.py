"""`mbrl-bilevel train` and `mbrl-bilevel eval`: train an agent on a Gymnasium task into
runs/<name>/ (resumable from its checkpoint), and evaluate a trained run, optionally on video."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import tyro
from stable_baselines3.common.callbacks import BaseCallback, EvalCallback
from stable_baselines3.common.monitor import Monitor

from agents.mbpo import MBPO
from agents.pets import PETS
from envs.make import make_env
from mbrl_bilevel.reporting import plot_curves
from mbrl_bilevel.runs import create_run_dir, save_figure, write_csv, write_json
from mbrl_bilevel.validation import ConfigError

AGENTS = {"pets": PETS, "mbpo": MBPO}
CHECKPOINT = "checkpoints/agent.pt"


@dataclass(frozen=True)
class TrainConfig:
    """Train an agent on a Gymnasium continuous-control task."""

    env: str = "InvertedPendulum-v5"
    """Gymnasium env id."""
    agent: str = "pets"
    """Agent: pets (MPC) or mbpo (Dyna on SB3's SAC)."""
    dynamics_loss: str = "bilevel"
    """Dynamics learner: mse, nll, nll-beta, pg (U = I), pg-scaled, pg-raw-sigma, pg-plugin,
    pg-plugin-input (the plug-in U(x) from a regression of the held-out residuals),
    pg-plugin-input-beta (the same, its terms weighted by σ̂²(x)^0.5 as β-NLL weights NLL's, then
    its mean and variance heads refitted on the frozen trunk),
    bilevel (a diagonal reward U learned by implicit differentiation) or bilevel-input (U(x))."""
    steps: int = 1500
    """Total env steps."""
    preset: str = "tiny"
    """Agent sizes: tiny (a small model and planner: minutes on a CPU, enough for
    InvertedPendulum and the point mass), cpu (sized for this machine's 2 cores: harder tasks),
    the paper's defaults (pets for pets, mbpo for mbpo), or sac (mbpo without a model: plain SB3
    SAC, the baseline)."""
    seed: int = 0
    """Seed of the agent and the env."""
    plan_dtype: str = "float32"
    """PETS only: dtype of the model evaluations while planning, float32 or bfloat16 (faster only
    on CPUs with bf16 matmul units or a GPU; 18x slower on this AVX2 machine, docs/pets.md)."""
    eval_every: int = 500
    """Evaluate every this many env steps."""
    eval_episodes: int = 3
    """Episodes per evaluation."""
    name: str | None = None
    """Run name; default <env>-<agent>-<loss>-s<seed>-<time>."""
    out_dir: str = "runs"
    """Parent folder of run folders."""
    resume: str | None = None
    """A run folder to continue from its last checkpoint, up to its own --steps (its saved config
    is used; other options are ignored)."""
    checkpoint_every: int = 1
    """Save the agent at the first episode end after this many env steps since the last save
    (1: after every episode; a save of an MBPO agent on Hopper takes about 0.5 s)."""
    threads: int = 1
    """Torch threads (1 whenever runs share the machine)."""
    progress: bool = True
    """Show a progress bar (on a terminal)."""

    def validate(self) -> None:
        """Raise ConfigError for an unknown agent or preset or a count <= 0."""
        _check(self)


class EpisodeCheckpoint(BaseCallback):
    """Save the agent (atomically) at the end of the first episode after `every` env steps since
    the last save (every=1: after every episode), so a killed run loses at most the steps since."""

    def __init__(self, path: Path, every: int = 1):
        super().__init__()
        self.path, self.every, self.saved_at = path, every, 0

    def _on_training_start(self) -> None:
        self.saved_at = self.model.num_timesteps

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        if self.model.num_timesteps - self.saved_at >= self.every:
            self.model.save(self.path)
            self.saved_at = self.model.num_timesteps


def run_train(config: TrainConfig) -> None:
    if config.resume:
        run_dir = Path(config.resume)
        if not (run_dir / "config.json").is_file():
            raise ConfigError(f"{run_dir} is not a run folder (no config.json)")
        saved = json.loads((run_dir / "config.json").read_text())
        config = TrainConfig(**{**saved, "resume": config.resume, "progress": config.progress})
    _check(config)
    torch.set_num_threads(config.threads)
    env, eval_env = (
        make_env(config.env, seed=config.seed),
        Monitor(make_env(config.env, seed=config.seed + 1)),  # true episode returns in eval
    )
    name = config.name or f"{config.env}-{config.agent}-{config.dynamics_loss}-s{config.seed}"
    run_dir = (
        Path(config.resume)
        if config.resume
        else create_run_dir(
            config.out_dir,
            f"{name}-{time.strftime('%Y%m%d-%H%M%S')}" if not config.name else name,
            "",
        )
    )
    checkpoint = run_dir / CHECKPOINT
    if not config.resume and checkpoint.is_file():
        raise ConfigError(
            f"{run_dir} holds an interrupted run: continue it with --resume {run_dir}, "
            "or pass another --name"
        )
    write_json(run_dir / "config.json", asdict(config) | {"resume": None})
    agent_type = AGENTS[config.agent]
    if config.resume and checkpoint.is_file():
        agent = agent_type.load(checkpoint, env, tensorboard_log=str(run_dir))
        print(f"resumed at step {agent.num_timesteps} from {checkpoint}")
    else:
        agent = agent_type(
            env,
            dynamics_loss=config.dynamics_loss,
            config=agent_config(config),
            tensorboard_log=str(run_dir),
            seed=config.seed,
        )
    evaluation = EvalCallback(
        eval_env,
        n_eval_episodes=config.eval_episodes,
        eval_freq=config.eval_every,
        log_path=str(run_dir / "eval"),
        verbose=0,
    )
    evaluation.n_calls = agent.num_timesteps  # a resumed run evaluates at the same steps
    restore_evaluations(evaluation, run_dir / "eval" / "evaluations.npz", agent.num_timesteps)
    start, steps_before = time.perf_counter(), agent.num_timesteps
    agent.learn(
        config.steps,
        callback=[evaluation, EpisodeCheckpoint(checkpoint, config.checkpoint_every)],
        progress_bar=config.progress,
    )
    seconds_per_step = (time.perf_counter() - start) / max(agent.num_timesteps - steps_before, 1)
    agent.save(checkpoint)
    _write_outputs(run_dir, agent, evaluation, seconds_per_step, config.seed)


def restore_evaluations(evaluation: EvalCallback, path: Path, up_to_step: int) -> None:
    """Give a resumed run's `evaluation` the evaluations saved at steps <= `up_to_step` (the
    checkpoint's), so its evaluations.npz keeps them; later ones are made again."""
    if not path.is_file():
        return
    saved = np.load(path)
    kept = saved["timesteps"] <= up_to_step
    evaluation.evaluations_timesteps = saved["timesteps"][kept].tolist()
    evaluation.evaluations_results = saved["results"][kept].tolist()
    evaluation.evaluations_length = saved["ep_lengths"][kept].tolist()


def agent_config(config: TrainConfig):
    """The preset's agent config, with --plan-dtype applied (PETS only)."""
    preset = AGENTS[config.agent].presets[config.preset]
    if config.agent == "pets":
        return replace(preset, plan_dtype=config.plan_dtype)
    if config.plan_dtype != "float32":
        raise ConfigError(f"--plan-dtype applies to PETS only, not {config.agent}")
    return preset


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
    }
    write_json(run_dir / "summary.json", summary)
    print(json.dumps(summary, indent=2))
    print(f"run folder: {run_dir}\nTensorBoard: tensorboard --logdir {run_dir}")


def _check(config: TrainConfig) -> None:
    if config.agent not in AGENTS:
        raise ConfigError(f"unknown agent {config.agent!r}; choose from {sorted(AGENTS)}")
    presets = AGENTS[config.agent].presets
    if config.preset not in presets:
        raise ConfigError(
            f"unknown preset {config.preset!r} for {config.agent}; choose from {sorted(presets)}"
        )
    for field in ("steps", "eval_every", "eval_episodes", "checkpoint_every", "threads"):
        if getattr(config, field) <= 0:
            raise ConfigError(
                f"--{field.replace('_', '-')} must be > 0, got {getattr(config, field)}"
            )
    agent_config(config)  # an unknown --plan-dtype, or one given to MBPO
    os.environ.setdefault("MUJOCO_GL", "egl")


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
    if not checkpoint.is_file() or not (run_dir / "config.json").is_file():
        raise ConfigError(f"{run_dir} has no config.json and {CHECKPOINT}: not a trained run")
    if config.episodes <= 0:
        raise ConfigError(f"--episodes must be > 0, got {config.episodes}")
    train_config = json.loads((run_dir / "config.json").read_text())
    env = make_env(train_config["env"], seed=config.seed)
    if config.video:
        if "rgb_array" not in env.metadata.get("render_modes", []):
            raise ConfigError(f"{train_config['env']} cannot render frames: drop --video")
        env = make_env(train_config["env"], seed=config.seed, render_mode="rgb_array")
    agent = AGENTS[train_config["agent"]].load(checkpoint, env)
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
