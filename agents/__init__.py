"""Model-based agents with the Stable-Baselines3 surface: PETS (MPC with CEM/iCEM) and MBPO (Dyna
on SB3's SAC), each configured by a preset resolved per env and changed field by field.

    from agents import PETS
    agent = PETS(env, dynamics_loss="pg-plugin-input-beta", config="cpu", seed=0).learn(5000)
"""

from agents.base import AgentConfig, ModelConfig
from agents.mbpo import MBPO, DynaConfig, MBPOConfig
from agents.pets import PETS, PETSConfig, PlannerConfig

__all__ = [
    "MBPO",
    "PETS",
    "AgentConfig",
    "DynaConfig",
    "MBPOConfig",
    "ModelConfig",
    "PETSConfig",
    "PlannerConfig",
]
