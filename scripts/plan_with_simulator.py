"""CEM with the MuJoCo simulator itself as the model: whether a planner and a planning reward can
solve a task at all, apart from any learned model.

    python scripts/plan_with_simulator.py --env InvertedPendulum-v5 --horizon 10 --reward env
    python scripts/plan_with_simulator.py --env InvertedPendulum-v5 --horizon 10 --reward plan

Every candidate action sequence is played from a copy of the real state; its return sums the
task's reward (env) or planning reward (plan) until the task's termination fires, as the PETS
evaluator does. Planner sizes are the `tiny` preset's. Prints the episode's env return.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import numpy as np
import torch

from agents.pets import PRESETS
from agents.planners import CEMPlanner
from envs import make_env, task_functions


def simulated_returns(
    sim, qpos, qvel, actions: torch.Tensor, *, reward, terminated
) -> torch.Tensor:
    """Returns [P] of action sequences [P, H, A] played in `sim` from (qpos, qvel)."""
    starts, next_obs = [], []
    for sequence in actions.numpy():
        sim.set_state(qpos, qvel)
        observation = sim._get_obs()
        for action in sequence:
            starts.append(observation)
            sim.do_simulation(action, sim.frame_skip)
            observation = sim._get_obs()
            next_obs.append(observation)
    shape = (*actions.shape[:2], -1)
    obs = torch.as_tensor(np.array(starts), dtype=torch.float32).view(shape)
    after = torch.as_tensor(np.array(next_obs), dtype=torch.float32).view(shape)
    rewards = reward(obs, actions, after)  # [P, H]
    done = terminated(obs, actions, after).cumsum(1)  # steps after the first termination
    alive_before = torch.cat([torch.zeros_like(done[:, :1]), done[:, :-1]], 1) == 0
    return (rewards * alive_before).sum(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="InvertedPendulum-v5")
    parser.add_argument("--horizon", type=int, default=10)
    parser.add_argument("--reward", choices=["env", "plan"], default="plan")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    task = task_functions(args.env)
    reward = task.reward if args.reward == "env" else task.planning_reward
    env, sim = make_env(args.env, seed=args.seed), make_env(args.env).unwrapped
    config = PRESETS["tiny"].planner_config()
    config = type(config)(**{**config.__dict__, "horizon": args.horizon})
    low, high = (torch.as_tensor(b) for b in (env.action_space.low, env.action_space.high))
    planner = CEMPlanner(low, high, config, torch.Generator().manual_seed(args.seed))
    obs, _ = env.reset(seed=args.seed)
    total, length, start, done = 0.0, 0, time.perf_counter(), False
    while not done:
        qpos, qvel = env.unwrapped.data.qpos.copy(), env.unwrapped.data.qvel.copy()
        objective = partial(
            simulated_returns, sim, qpos, qvel, reward=reward, terminated=task.terminated
        )
        action = planner.act(objective)
        obs, step_reward, terminated, truncated, _ = env.step(action.numpy())
        total, length, done = total + float(step_reward), length + 1, terminated or truncated
    seconds = time.perf_counter() - start
    print(
        f"{args.env} horizon {args.horizon}, {args.reward} reward: return {total:.0f} "
        f"in {length} steps (final cart x {obs[0]:+.2f}), {seconds / length * 1e3:.0f} ms/step"
    )


if __name__ == "__main__":
    main()
