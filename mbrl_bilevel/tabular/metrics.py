"""Test metrics of a classifier's predicted probabilities (scikit-learn where it has them)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mbrl_bilevel.data import Dataset

METRICS = ("accuracy", "nll", "ece", "macro_f1", "roc_auc")


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE: Σ_bins (n_bin/N)·|accuracy_bin - mean confidence_bin| over `bins` equal
    bins of the confidence max_k p_k. probs [N, C], y [N]."""
    confidence = probs.max(1)
    correct = probs.argmax(1) == y
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    total = 0.0
    for b in np.unique(which):
        members = which == b
        total += members.sum() * abs(correct[members].mean() - confidence[members].mean())
    return float(total / len(y))


def classification_metrics(probs: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """accuracy, nll (nats/sample), ece (15 bins), macro_f1 and roc_auc (binary, or macro
    one-vs-rest for more classes; NaN if a class is absent) from probs [N, C] and labels y [N]."""
    from sklearn.metrics import accuracy_score, f1_score, log_loss, roc_auc_score  # slow import

    num_classes = probs.shape[1]
    labels = np.arange(num_classes)
    probs = probs / probs.sum(1, keepdims=True)  # float32 rounding; sklearn checks the sums
    prediction = probs.argmax(1)
    if len(np.unique(y)) < num_classes:
        auc = float("nan")  # undefined when a class is absent from the split
    elif num_classes == 2:
        auc = roc_auc_score(y, probs[:, 1])
    else:
        auc = roc_auc_score(y, probs, multi_class="ovr", labels=labels)
    return {
        "accuracy": float(accuracy_score(y, prediction)),
        "nll": float(log_loss(y, probs, labels=labels)),
        "ece": expected_calibration_error(probs, y),
        "macro_f1": float(f1_score(y, prediction, average="macro", labels=labels)),
        "roc_auc": float(auc),
    }


@torch.no_grad()
def evaluate_classifier(predictor: nn.Module, data: Dataset) -> dict[str, float]:
    """`classification_metrics` of a categorical predictor on a split."""
    probs = predictor(data.x).probs.double().numpy()
    return classification_metrics(probs, data.y.numpy())
