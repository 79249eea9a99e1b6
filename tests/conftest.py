import os

import pytest
import torch

os.environ.setdefault("MUJOCO_GL", "egl")
torch.set_num_threads(1)

SIGMA_3D = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 0.5]], dtype=torch.float64)


@pytest.fixture
def sigma3():
    """A non-diagonal SPD 3x3 noise covariance (the CLI example of the core issue)."""
    return SIGMA_3D.clone()


@pytest.fixture
def reward_matrix3():
    """A non-diagonal SPD 3x3 reward matrix U."""
    A = torch.tensor([[1.0, 0.4, -0.2], [0.0, 0.8, 0.5], [0.0, 0.0, 1.2]], dtype=torch.float64)
    return A @ A.T + 0.1 * torch.eye(3, dtype=torch.float64)
