"""Tabular methods: PG under U = βI reaches its closed-form optimum; β* beats β = 1 on NLL."""

import copy

import pytest
import torch

from mbrl_bilevel.data import Dataset
from mbrl_bilevel.tabular.data import Splits, load_bundled, split
from mbrl_bilevel.tabular.methods import MethodOptions, beta_star, make_model, train_method
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
