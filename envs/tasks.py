"""Task reward and termination functions in torch, batched over any leading dimensions.

Every function takes obs [..., O], action [..., A] and next_obs [..., O] (the transition
s -> s') and returns reward [...] (float) or terminated [...] (bool). They reproduce the
Gymnasium MuJoCo v5 tasks with their default keyword arguments; docs/results/envs.md lists which are
exact and how large the error of the approximate ones is.

The forward-velocity tasks reward (x_after - x_before) / dt, and x is not in the v5
observation. Their reward here uses the velocity in the observation, interpolated between s and
s' with a per-task weight: 0.5 (the trapezoid rule) for the RK4 tasks, 0.7 for HalfCheetah
(semi-implicit Euler weighs the later substeps more; 0.7 had the smallest mean error on
independent recordings).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from envs.point_mass import point_mass_reward

TaskFunction = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class TaskFunctions:
    """The reward [...] and terminated [...] functions of one task, all f(obs, action, next_obs).

    `plan_reward` is what a planner maximises when it is not the env's reward (None: the reward
    itself), as PETS planned with its own task costs.
    """

    reward: TaskFunction
    terminated: TaskFunction
    plan_reward: TaskFunction | None = None

    @property
    def planning_reward(self) -> TaskFunction:
        return self.plan_reward or self.reward


def never_terminated(obs: Tensor, action: Tensor, next_obs: Tensor) -> Tensor:
    """False [...] for tasks that only end by their time limit."""
    return torch.zeros(next_obs.shape[:-1], dtype=torch.bool, device=next_obs.device)


def _control_cost(action: Tensor, weight: float) -> Tensor:
    """weight * ||a||^2 [...]."""
    return weight * action.square().sum(-1)


def _forward_velocity(obs: Tensor, next_obs: Tensor, index: int, weight: float) -> Tensor:
    """(1 - weight) * v + weight * v' [...] from the root x velocity at obs[..., index]."""
    return torch.lerp(obs[..., index], next_obs[..., index], weight)


def _between(x: Tensor, low: float, high: float) -> Tensor:
    """low < x < high [...] (strict, as the v5 health checks)."""
    return (x > low) & (x < high)


# HalfCheetah-v5: obs = qpos[1:9], qvel[0:9]; the root x velocity is obs[8].
def half_cheetah_reward(obs: Tensor, action: Tensor, next_obs: Tensor) -> Tensor:
    return _forward_velocity(obs, next_obs, 8, 0.7) - _control_cost(action, 0.1)


# Hopper-v5: obs = qpos[1:6] (z, angle, 3 joints), clip(qvel, -10, 10); x velocity at obs[5].
def hopper_healthy(next_obs: Tensor) -> Tensor:
    z, angle, state = next_obs[..., 0], next_obs[..., 1], next_obs[..., 1:]
    return (z > 0.7) & _between(angle, -0.2, 0.2) & _between(state, -100.0, 100.0).all(-1)


def hopper_reward(obs: Tensor, action: Tensor, next_obs: Tensor) -> Tensor:
    healthy = hopper_healthy(next_obs).to(next_obs.dtype)
    return _forward_velocity(obs, next_obs, 5, 0.5) + healthy - _control_cost(action, 1e-3)


def hopper_terminated(obs: Tensor, action: Tensor, next_obs: Tensor) -> Tensor:
    return ~hopper_healthy(next_obs)


# Walker2d-v5: obs = qpos[1:9] (z, angle, 6 joints), clip(qvel, -10, 10); x velocity at obs[8].
def walker2d_healthy(next_obs: Tensor) -> Tensor:
    return _between(next_obs[..., 0], 0.8, 2.0) & _between(next_obs[..., 1], -1.0, 1.0)


def walker2d_reward(obs: Tensor, action: Tensor, next_obs: Tensor) -> Tensor:
    healthy = walker2d_healthy(next_obs).to(next_obs.dtype)
    return _forward_velocity(obs, next_obs, 8, 0.5) + healthy - _control_cost(action, 1e-3)


def walker2d_terminated(obs: Tensor, action: Tensor, next_obs: Tensor) -> Tensor:
    return ~walker2d_healthy(next_obs)


# Swimmer-v5: obs = qpos[2:5], qvel[0:5]; x velocity at obs[3].
def swimmer_reward(obs: Tensor, action: Tensor, next_obs: Tensor) -> Tensor:
    return _forward_velocity(obs, next_obs, 3, 0.5) - _control_cost(action, 1e-4)


# Ant-v5: obs = qpos[2:15] (z first), qvel[0:14] (x velocity at 13), clipped cfrc_ext[1:] (27:105).
def ant_healthy(next_obs: Tensor) -> Tensor:
    z = next_obs[..., 0]
    return torch.isfinite(next_obs).all(-1) & (z >= 0.2) & (z <= 1.0)


def ant_reward(obs: Tensor, action: Tensor, next_obs: Tensor) -> Tensor:
    healthy = ant_healthy(next_obs).to(next_obs.dtype)
    contact_cost = 5e-4 * next_obs[..., 27:].square().sum(-1)
    return (
        _forward_velocity(obs, next_obs, 13, 0.5)
        + healthy
        - _control_cost(action, 0.5)
        - contact_cost
    )


def ant_terminated(obs: Tensor, action: Tensor, next_obs: Tensor) -> Tensor:
    return ~ant_healthy(next_obs)


# Reacher-v5: obs = cos q, sin q, target xy, joint velocities, (fingertip - target)[:2] at 8:10.
def reacher_reward(obs: Tensor, action: Tensor, next_obs: Tensor) -> Tensor:
    return -torch.linalg.vector_norm(next_obs[..., 8:10], dim=-1) - _control_cost(action, 1.0)


# Pusher-v5: obs = qpos[:7], qvel[:7], tips_arm xyz (14:17), object xyz (17:20), goal xyz (20:23).
def pusher_reward(obs: Tensor, action: Tensor, next_obs: Tensor) -> Tensor:
    tips, target, goal = next_obs[..., 14:17], next_obs[..., 17:20], next_obs[..., 20:23]
    near = torch.linalg.vector_norm(target - tips, dim=-1)
    dist = torch.linalg.vector_norm(target - goal, dim=-1)
    return -0.5 * near - dist - _control_cost(action, 0.1)


# InvertedPendulum-v5: obs = cart x, pole angle, their velocities.
def inverted_pendulum_terminated(obs: Tensor, action: Tensor, next_obs: Tensor) -> Tensor:
    return ~torch.isfinite(next_obs).all(-1) | (next_obs[..., 1].abs() > 0.2)


def inverted_pendulum_reward(obs: Tensor, action: Tensor, next_obs: Tensor) -> Tensor:
    return (~inverted_pendulum_terminated(obs, action, next_obs)).to(next_obs.dtype)


def inverted_pendulum_plan_reward(obs: Tensor, action: Tensor, next_obs: Tensor) -> Tensor:
    """exp(-|tip - upright tip|² / 0.6²) while alive (the PETS paper's cartpole cost; the 0.6 m
    pole). The env's reward (1 while the pole is up) ties every candidate that survives the
    horizon, so even with the simulator as its model CEM lets the cart drift into the rail and
    the pole falls (docs/results/pets.md)."""
    x, angle = next_obs[..., 0], next_obs[..., 1]
    distance = (x + 0.6 * torch.sin(angle)).square() + (0.6 * torch.cos(angle) - 0.6).square()
    alive = inverted_pendulum_reward(obs, action, next_obs)
    return alive * torch.exp(-distance / 0.36)


# InvertedDoublePendulum-v5: obs = cart x, sin q1, sin q2, cos q1, cos q2,
# clip(qvel, -10, 10) (cart, q1, q2), clipped constraint force. Two 0.6 m links on a cart at z = 0.
def inverted_double_pendulum_tip(next_obs: Tensor) -> tuple[Tensor, Tensor]:
    """Tip position (x [...], height [...]) from the cart position and the link angles."""
    sin1, sin2, cos1, cos2 = next_obs[..., 1], next_obs[..., 2], next_obs[..., 3], next_obs[..., 4]
    x = next_obs[..., 0] + 0.6 * (sin1 + sin1 * cos2 + cos1 * sin2)
    y = 0.6 * (cos1 + cos1 * cos2 - sin1 * sin2)
    return x, y


def inverted_double_pendulum_terminated(obs: Tensor, action: Tensor, next_obs: Tensor) -> Tensor:
    return inverted_double_pendulum_tip(next_obs)[1] <= 1.0


def inverted_double_pendulum_reward(obs: Tensor, action: Tensor, next_obs: Tensor) -> Tensor:
    x, y = inverted_double_pendulum_tip(next_obs)
    alive = 10.0 * (y > 1.0).to(next_obs.dtype)
    distance_penalty = 0.01 * x.square() + (y - 2.0).square()
    velocity_penalty = 1e-3 * next_obs[..., 6].square() + 5e-3 * next_obs[..., 7].square()
    return alive - distance_penalty - velocity_penalty


TASKS: dict[str, TaskFunctions] = {
    "HalfCheetah-v5": TaskFunctions(half_cheetah_reward, never_terminated),
    "Hopper-v5": TaskFunctions(hopper_reward, hopper_terminated),
    "Walker2d-v5": TaskFunctions(walker2d_reward, walker2d_terminated),
    "Ant-v5": TaskFunctions(ant_reward, ant_terminated),
    "Swimmer-v5": TaskFunctions(swimmer_reward, never_terminated),
    "Reacher-v5": TaskFunctions(reacher_reward, never_terminated),
    "Pusher-v5": TaskFunctions(pusher_reward, never_terminated),
    "InvertedPendulum-v5": TaskFunctions(
        inverted_pendulum_reward, inverted_pendulum_terminated, inverted_pendulum_plan_reward
    ),
    "InvertedDoublePendulum-v5": TaskFunctions(
        inverted_double_pendulum_reward, inverted_double_pendulum_terminated
    ),
    "mbrl_bilevel/PointMass-v0": TaskFunctions(point_mass_reward, never_terminated),
}


def task_functions(env_id: str) -> TaskFunctions | None:
    """The known reward and termination of `env_id`, or None: the model must learn the reward.

    Only the default keyword arguments are covered: an env made with other reward weights or
    health ranges needs its own functions.
    """
    return TASKS.get(env_id)
