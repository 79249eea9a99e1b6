"""The figure of the paper's figure 3: the entries of U over training, converging to U*."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from mbrl_bilevel.reporting import plt


def plot_u_entries(rows: list[dict], u_star: torch.Tensor, title: str):
    """rows: long format with step, seed and u_ij (i <= j) keys; one line per entry (mean over
    seeds, ± 1 std band), dashed at U*_ij. Returns the matplotlib figure."""
    figure, ax = plt.subplots(figsize=(5.5, 3.6))
    dim = u_star.shape[0]
    rows_, cols_ = torch.triu_indices(dim, dim).tolist()
    for index, (i, j) in enumerate(zip(rows_, cols_, strict=True)):
        key, color = f"u_{i}{j}", f"C{index % 10}"
        by_step = defaultdict(list)
        for row in rows:
            if row.get(key) is not None:
                by_step[row["step"]].append(row[key])
        steps = sorted(by_step)
        values = [np.asarray(by_step[s]) for s in steps]
        mean = np.array([v.mean() for v in values])
        std = np.array([v.std() for v in values])
        ax.plot(steps, mean, color=color, label=f"U[{i},{j}]")
        ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2)
        ax.axhline(float(u_star[i, j]), color=color, linestyle="--", linewidth=1)
    ax.set_xlabel("inner step")
    ax.set_ylabel("entry of U (dashed: U* = (λ/2)Σ⁻¹)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    return figure
