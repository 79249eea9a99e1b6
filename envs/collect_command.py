"""`mbrl-bilevel collect`: make a transition dataset (.npz or local Minari) from any env."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class CollectConfig:
    """Collect transitions with a random or a SAC ("medium") policy and store them."""

    out: str
    """Where to store: a .npz path, or a Minari dataset id such as halfcheetah/random-v0."""
    env: str = "HalfCheetah-v5"
    """Gymnasium env id (continuous actions)."""
    steps: int = 50_000
    """Transitions to collect."""
    policy: Literal["random", "sac"] = "random"
    """random: uniform actions; sac: a SAC policy trained for --sac-steps first ("medium" data)."""
    sac_steps: int = 100_000
    """SAC training steps when --policy sac."""
    seed: int = 0
    """Seed of the env, the random actions and SAC."""
    data_dir: str | None = None
    """Minari root folder; default $MINARI_DATASETS_PATH or ~/.minari/datasets."""
    threads: int = 1
    """Torch threads (1 when runs share the machine)."""
    progress: bool = True
    """Show progress bars (only on a terminal)."""


def run_collect(config: CollectConfig) -> None:
    """Collect, store, and print where the data went and how long it took."""
    import torch

    from envs.collect import collect, collect_with_sac
    from envs.datasets import check_destination, save_transitions
    from envs.make import make_env
    from mbrl_bilevel.validation import check_positive

    check_positive(config.steps, "--steps")
    check_positive(config.threads, "--threads")
    if config.policy == "sac":
        check_positive(config.sac_steps, "--sac-steps")
    check_destination(config.out, config.data_dir)  # fail before collecting, not after
    torch.set_num_threads(config.threads)
    env = make_env(config.env, seed=config.seed)
    start = time.perf_counter()
    if config.policy == "sac":
        data = collect_with_sac(env, config.steps, config.sac_steps, config.seed, config.progress)
    else:
        data = collect(env, config.steps, seed=config.seed, progress=config.progress)
    seconds = time.perf_counter() - start
    where = save_transitions(data, config.out, env_id=config.env, data_dir=config.data_dir)
    episodes = int((data.terminations | data.truncations).sum())
    print(
        f"collected {len(data)} transitions ({episodes} episodes, mean reward "
        f"{data.rewards.mean():.3f}) from {config.env} with the {config.policy} policy "
        f"in {seconds:.1f} s"
    )
    print(f"saved to {where}")
