"""Environments: the env factory, task reward and termination functions in torch, the point-mass
test task, and transition-data collection and storage. Imports mbrl_bilevel, never agents."""

from envs.make import check_env_id, make_env
from envs.point_mass import POINT_MASS_ID, register_point_mass
from envs.tasks import TaskFunctions, task_functions

register_point_mass()

__all__ = ["POINT_MASS_ID", "TaskFunctions", "check_env_id", "make_env", "task_functions"]
