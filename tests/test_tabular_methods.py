"""Tabular methods: PG under U = βI reaches its closed-form optimum; β* beats β = 1 on NLL."""

import copy

import pytest
import torch

from mbrl_bilevel.data import Dataset
from mbrl_bilevel.rewards import FixedMahalanobis, OneHotReward
from mbrl_bilevel.tabular.data import Splits, load_bundled, split
from mbrl_bilevel.tabular.methods import (
    MethodOptions,
    OneHotView,
    beta_star,
    make_model,
    one_hot_targets,
    train_method,
)
from mbrl_bilevel.tabular.metrics import evaluate_classifier


def constant_input_splits(frequencies, n=200):
    """x = 0 everywhere, so a logistic model is one Categorical; labels in the given shares."""
    counts = [round(f * n) for f in frequencies]
    y = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    data = Dataset(torch.zeros(len(y), 1), y)
    return Splits(data, data, data)


@pytest.mark.parametrize("method", ["pg", "pg-star"])
def test_pg_reaches_the_tempered_optimum(method):
    # J = Σ_k p_k (-2β (1 - q_k)) + λ H(p) is maximised by p_k ∝ exp(2β q_k / λ)
    q = torch.tensor([0.6, 0.3, 0.1])
    splits = constant_input_splits(q.tolist())
    options = MethodOptions(lam=2.0, beta=1.0, steps=400, lr=0.05, batch_size=None)
    beta = options.beta if method == "pg" else beta_star(splits.train.y, 3, options.lam)
    torch.manual_seed(0)
    model = make_model("logistic", 1, 3, ())
    history, used = train_method(method, model, splits, options, seed=0)
    assert used == pytest.approx(beta)
    expected = torch.softmax(2 * beta * q / options.lam, 0)
    probs = model(torch.zeros(1, 1)).probs[0].detach()
    assert torch.allclose(probs, expected, atol=0.03), (probs, expected)
    assert history[-1]["step"] == 400 and "curve/nll" in history[-1]


def test_pg_star_matches_nll_accuracy_and_beats_beta_one_on_nll():
    splits = split(load_bundled("breast_cancer"), seed=0)
    options = MethodOptions(steps=150)
    torch.manual_seed(0)
    initial = make_model("logistic", 30, 2, ())
    test = {}
    for method in ("nll", "pg", "pg-star"):
        model = copy.deepcopy(initial)
        train_method(method, model, splits, options, seed=0)
        test[method] = evaluate_classifier(model, splits.test)
    assert test["pg-star"]["accuracy"] >= test["nll"]["accuracy"] - 0.03
    assert test["pg-star"]["nll"] < test["pg"]["nll"] - 0.1


def test_one_hot_view_has_probability_mean_and_the_one_hot_reward(reward_matrix3):
    torch.manual_seed(0)
    model = make_model("logistic", 4, 3, ())
    x, y = torch.randn(5, 4), torch.tensor([0, 2, 1, 1, 0])
    view = OneHotView(model)
    assert torch.allclose(view(x).mean, model(x).probs)
    samples = view(x).sample((7,))  # [G, B, C] one-hot
    assert samples.shape == (7, 5, 3) and (samples.sum(-1) == 1).all()
    U = reward_matrix3.float()
    targets = one_hot_targets(Dataset(x, y), 3).y
    on_vectors = FixedMahalanobis(U)(samples, targets)
    on_indices = OneHotReward(FixedMahalanobis(U))(samples.argmax(-1), y)
    assert torch.allclose(on_vectors, on_indices)


def test_plugin_reward_on_constant_inputs_is_beta_star():
    # p_θ is the same at every input, so the centred residuals e_y - p are the centred labels:
    # tr Σ̂ = N/(N-1)·(1 - Σ q²) and the scalar plug-in λC/(2 tr Σ̂) is β*
    pytest.importorskip("mbrl_bilevel.solvers.plugin")
    q = torch.tensor([0.6, 0.3, 0.1])
    splits = constant_input_splits(q.tolist())
    options = MethodOptions(lam=2.0, steps=200, lr=0.05, batch_size=None, refresh_every=50)
    torch.manual_seed(0)
    model = make_model("logistic", 1, 3, ())
    history, beta = train_method("pg-plugin", model, splits, options, seed=0)
    assert beta == pytest.approx(beta_star(splits.train.y, 3, options.lam), rel=1e-4)
    assert "curve/nll" in history[-1]


def test_bilevel_finds_the_scale_with_the_best_held_out_likelihood():
    # on constant inputs the PG optimum is p = softmax(2β q/λ); the held-out NLL -Σ q log p is
    # smallest at 2β/λ = c* (a 1-D grid search), well below β* (the bilevel's starting point)
    pytest.importorskip("mbrl_bilevel.solvers.bilevel")
    q = torch.tensor([0.6, 0.3, 0.1])
    grid = torch.linspace(0.5, 10, 9501)
    c_star = grid[torch.stack([-(q * torch.log_softmax(c * q, 0)).sum() for c in grid]).argmin()]
    splits = constant_input_splits(q.tolist())
    options = MethodOptions(
        lam=2.0, steps=1200, inner_steps=20, lr=0.05, outer_lr=0.05, batch_size=None
    )
    start = beta_star(splits.train.y, 3, options.lam)
    torch.manual_seed(0)
    model = make_model("logistic", 1, 3, ())
    history, beta = train_method("bilevel", model, splits, options, seed=0)
    assert start > 1.5 * float(c_star)  # the test is not won at the start
    assert beta == pytest.approx(float(c_star) * options.lam / 2, rel=0.15)
    assert history[-1]["step"] == 1200


def test_solver_warnings_are_silenced_only_inside_the_study():
    import logging

    from mbrl_bilevel.tabular.study import solver_warnings_silenced

    logger = logging.getLogger("mbrl_bilevel.solvers")
    before = logger.level
    with solver_warnings_silenced():
        assert logger.getEffectiveLevel() == logging.ERROR
    assert logger.level == before
