import pytest
import torch

from agents.planners import CEMConfig, CEMPlanner, coloured_noise
from mbrl_bilevel.validation import ConfigError

LOW, HIGH = -torch.ones(2), torch.ones(2)


def quadratic(target):
    def objective(actions):  # [P, H, A] -> [P]
        return -(actions - target).pow(2).sum((1, 2))

    return objective


@pytest.mark.parametrize(
    "config",
    [
        CEMConfig(horizon=8, population=300, elites=30, iterations=12),
        CEMConfig(
            horizon=8,
            population=300,
            elites=30,
            iterations=12,
            noise_beta=2.0,
            keep_elites=0.3,
            population_decay=1.25,
        ),
    ],
    ids=["cem", "icem"],
)
def test_planner_finds_the_optimum_inside_the_box(config):
    steps = torch.arange(8.0)[:, None]
    target = 0.8 * torch.sin(steps / 3 + torch.tensor([0.0, 1.5]))  # a smooth plan, as in control
    planner = CEMPlanner(LOW, HIGH, config, torch.Generator().manual_seed(0))
    best = planner.plan(quadratic(target))
    assert (best - target).abs().max() < 0.15
    random = torch.rand(300, 8, 2) * 2 - 1
    assert quadratic(target)(best[None]) > quadratic(target)(random).max()


def test_samples_stay_in_box_and_warm_start_shifts():
    planner = CEMPlanner(LOW, HIGH, CEMConfig(horizon=5, population=50, elites=5, iterations=4))
    seen = []

    def objective(actions):
        seen.append(actions)
        return -actions[..., 0].sum(1)  # prefers the lowest first coordinate everywhere

    first = planner.act(objective)
    assert all(((a >= LOW) & (a <= HIGH)).all() for a in seen)
    assert first[0] < -0.2
    assert torch.equal(planner.mean[-1], torch.zeros(2))  # shifted in a fresh last step
    assert planner.mean[0, 0] < -0.2  # the rest of the plan is kept
    planner.reset()
    assert torch.equal(planner.mean, torch.zeros(5, 2))


def test_coloured_noise_is_smoother_than_white():
    g = torch.Generator().manual_seed(0)
    white, red = coloured_noise((200, 30, 1), 0.0, g), coloured_noise((200, 30, 1), 2.0, g)

    def roughness(x):
        return (x[:, 1:] - x[:, :-1]).pow(2).mean()

    assert roughness(red) < 0.5 * roughness(white)
    assert red.std() == pytest.approx(1.0, abs=0.1)


def test_bad_planner_config():
    with pytest.raises(ConfigError):
        CEMConfig(population=10, elites=20)
    with pytest.raises(ConfigError):
        CEMPlanner(HIGH, LOW, CEMConfig())
