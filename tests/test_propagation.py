"""Particle propagation against hand-computed returns, with members whose dynamics are known."""

import pytest
import torch
from torch import nn

from agents.propagation import TrajectoryEvaluator


class OffsetEnsemble(nn.Module):
    """Member e moves the state by action + offsets[e] (std `noise`): x [E', B, 2] -> mean, std
    [E', B, 1]. With `reward`, a second output column predicts the reward reward[e]."""

    def __init__(self, offsets, noise=1e-6, elites=None, reward=None):
        super().__init__()
        self.offsets = torch.tensor(offsets, dtype=torch.float32)
        mask = torch.ones(len(offsets), dtype=torch.bool) if elites is None else elites
        self.register_buffer("elite_mask", mask)
        self.noise, self.reward = noise, reward
        self.out_dim = 1 if reward is None else 2

    def frozen_members(self, index, dtype):
        offsets = self.offsets[index, None, None]
        rewards = None if self.reward is None else torch.tensor(self.reward)[index, None, None]

        def members(x):
            loc = x[..., 1:2] + offsets
            if rewards is not None:
                loc = torch.cat([loc, rewards.expand_as(loc)], -1)
            return loc, torch.full_like(loc, self.noise)

        return members


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


@pytest.mark.parametrize("propagation", ["ts1", "tsinf", "expectation"])
def test_learned_reward_is_the_mean_of_the_members_reward_column(propagation):
    model = OffsetEnsemble([0.0, 0.0, 0.0], noise=0.5, reward=[1.0, 3.0, 100.0])
    model.elite_mask[2] = False
    evaluator = TrajectoryEvaluator(model, None, None, particles=10, propagation=propagation)
    evaluator.set_start(torch.tensor([0.0]))
    returns = evaluator(torch.zeros(3, 4, 1))  # 4 steps of reward 1 or 3 on the two elites
    # 30 particles, 15 per elite: the mean return is exactly 8 (a sampled reward would not be)
    assert float(returns.mean()) == pytest.approx(8.0, abs=1e-4)
    assert returns.min() >= 4.0 and returns.max() <= 12.0


def test_model_output_must_match_the_reward_source():
    from mbrl_bilevel.validation import ConfigError

    evaluator = TrajectoryEvaluator(OffsetEnsemble([0.0]), None, None)
    with pytest.raises(ConfigError, match="learned reward needs 2"):
        evaluator.set_start(torch.tensor([0.0]))


@pytest.mark.parametrize("propagation", ["tsinf", "expectation"])
def test_gaussian_ensemble_rollout_uses_only_the_elites(propagation):
    """Against a hand rollout of ensemble(x).mean of the elites (noise-free members)."""
    from mbrl_bilevel.ensemble import GaussianEnsemble

    torch.manual_seed(0)
    model = GaussianEnsemble(
        3, 2, members=4, elites=2, hidden=(16,), min_log_var=-60.0, max_log_var=-50.0
    )
    model.elite_mask.copy_(torch.tensor([False, True, False, True]))
    evaluator = TrajectoryEvaluator(model, position, None, particles=2, propagation=propagation)
    start, actions = torch.tensor([0.3, -0.2]), torch.rand(1, 3, 1)
    evaluator.set_start(start)
    expected = 0.0
    for member in ([1], [3]) if propagation == "tsinf" else ([1, 3],):
        state = start
        for t in range(3):
            x = torch.cat([state, actions[0, t]])[None]
            state = state + model(x).mean[member].mean(0)[0].detach()
            expected += float(state[0]) / (2 if propagation == "tsinf" else 1)
    assert float(evaluator(actions)) == pytest.approx(expected, abs=1e-5)


def test_elite_snapshot_follows_changes_of_the_model():
    model = OffsetEnsemble([0.0, 1000.0], elites=torch.tensor([True, False]))
    evaluator = TrajectoryEvaluator(model, position, never, particles=2)
    evaluator.set_start(torch.tensor([0.0]))
    snapshot = evaluator.members
    evaluator.set_start(torch.tensor([1.0]))
    assert evaluator.members is snapshot  # unchanged model: no new copy
    model.elite_mask.copy_(torch.tensor([False, True]))
    evaluator.set_start(torch.tensor([0.0]))
    assert evaluator(torch.zeros(1, 2, 1)).item() == pytest.approx(3000.0, rel=1e-4)
