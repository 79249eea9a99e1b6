"""Tabular metrics and β*: hand-computed values."""

import math

import numpy as np
import pytest
import torch

from mbrl_bilevel.tabular.methods import beta_star, class_frequency_trace
from mbrl_bilevel.tabular.metrics import classification_metrics, expected_calibration_error


def test_ece_by_hand():
    # confidences 0.9 (right), 0.9 (wrong): one bin, |0.5 - 0.9| = 0.4
    probs = np.array([[0.9, 0.1], [0.9, 0.1]])
    assert expected_calibration_error(probs, np.array([0, 1])) == pytest.approx(0.4)
    # two bins: 0.6 right (|1 - 0.6| = 0.4) and 0.95 right (0.05), weights 1/2 each
    probs = np.array([[0.6, 0.4], [0.05, 0.95]])
    assert expected_calibration_error(probs, np.array([0, 1])) == pytest.approx(0.225)


def test_classification_metrics_multiclass_and_binary():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.5, 0.4, 0.1]])
    y = np.array([0, 1, 2, 1])
    m = classification_metrics(probs, y)
    assert m["accuracy"] == 0.75
    assert m["nll"] == pytest.approx(-np.mean(np.log([0.7, 0.8, 0.4, 0.4])))
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert 0.5 < m["roc_auc"] <= 1
    binary = classification_metrics(
        np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]]), np.array([0, 1, 1])
    )
    assert binary["roc_auc"] == pytest.approx(1.0)
    assert binary["accuracy"] == pytest.approx(2 / 3)


def test_beta_star_from_class_frequencies():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    trace = 100 / 99 * (1 - (0.5**2 + 0.3**2 + 0.2**2))
    assert class_frequency_trace(y, 3) == pytest.approx(trace)
    assert beta_star(y, 3, lam=10.0) == pytest.approx(10 * 3 / (2 * trace))
    balanced = torch.tensor([0, 1] * 50)
    assert beta_star(balanced, 2, lam=1.0) == pytest.approx(2 / (2 * 100 / 99 * 0.5))
    assert math.isfinite(beta_star(balanced, 2, lam=1.0))


def test_roc_auc_is_nan_when_a_class_is_absent():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
    m = classification_metrics(probs, np.array([0, 1]))
    assert math.isnan(m["roc_auc"]) and m["accuracy"] == 1.0
