"""Particle propagation against hand-computed returns, with members whose dynamics are known."""

import pytest
import torch
from torch import nn
from torch.distributions import Independent, Normal

from agents.propagation import TrajectoryEvaluator


class OffsetEnsemble(nn.Module):
    """Member e moves the state by action + offsets[e] (std `noise`); shape [M, B, O + A] -> O."""

    def __init__(self, offsets, noise=1e-6, elites=None):
        super().__init__()
        self.members = len(offsets)
        self.offsets = torch.tensor(offsets, dtype=torch.float32)
        mask = torch.ones(self.members, dtype=torch.bool) if elites is None else elites
        self.register_buffer("elite_mask", mask)
        self.noise = noise

    def forward(self, x):
        loc = x[..., 1:2] + self.offsets[: x.shape[0], None, None]
        return Independent(Normal(loc, torch.full_like(loc, self.noise)), 1)


def position(obs, action, next_obs):
    return next_obs[..., 0]


def never(obs, action, next_obs):
    return torch.zeros(obs.shape[:-1], dtype=torch.bool)


@pytest.mark.parametrize("propagation", ["ts1", "tsinf", "expectation"])
def test_deterministic_single_member_return(propagation):
    evaluator = TrajectoryEvaluator(
        OffsetEnsemble([0.0]), position, never, particles=3, propagation=propagation
    )
    evaluator.set_start(torch.tensor([1.0]))
    actions = torch.tensor([[[0.5], [0.5], [-1.0]], [[0.0], [0.0], [0.0]]])
    returns = evaluator(actions)  # positions 1.5, 2.0, 1.0 -> 4.5; and 1, 1, 1 -> 3
    assert torch.allclose(returns, torch.tensor([4.5, 3.0]), atol=1e-4)


def test_termination_stops_the_return():
    def crossed(obs, action, next_obs):
        return next_obs[..., 0] > 2.5

    evaluator = TrajectoryEvaluator(OffsetEnsemble([0.0]), position, crossed, particles=2)
    evaluator.set_start(torch.tensor([0.0]))
    returns = evaluator(torch.ones(1, 5, 1))  # positions 1, 2, 3 (terminal, counted), 4, 5
    assert torch.allclose(returns, torch.tensor([6.0]), atol=1e-4)


def test_non_elite_members_are_never_used():
    model = OffsetEnsemble([0.0, 1000.0], elites=torch.tensor([True, False]))
    for propagation in ("tsinf", "ts1", "expectation"):
        evaluator = TrajectoryEvaluator(
            model, position, never, particles=8, propagation=propagation
        )
        evaluator.set_start(torch.tensor([0.0]))
        assert evaluator(torch.zeros(3, 4, 1)).abs().max() < 1e-3


def test_ts_inf_keeps_members_and_ts1_reshuffles():
    """Members drift +1 or -1 per step; |position| grows like H under TS∞, like √H under TS1."""

    def distance(obs, action, next_obs):
        return next_obs[..., 0].abs()

    model = OffsetEnsemble([1.0, -1.0])
    horizon, results = 16, {}
    for propagation in ("tsinf", "ts1", "expectation"):
        evaluator = TrajectoryEvaluator(
            model, distance, never, particles=200, propagation=propagation
        )
        evaluator.set_start(torch.tensor([0.0]))
        results[propagation] = float(evaluator(torch.zeros(1, horizon, 1)))
    assert results["tsinf"] == pytest.approx(sum(range(1, horizon + 1)), rel=1e-4)
    assert results["ts1"] < 0.5 * results["tsinf"]
    assert results["expectation"] == pytest.approx(0.0, abs=1e-3)  # the mean drift is zero
