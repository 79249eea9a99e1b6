"""Input checks shared by the library and the CLI: one clear error naming the bad value."""

from __future__ import annotations

import math

import torch


class ConfigError(ValueError):
    """A user mistake (bad option, bad matrix, bad data). The CLI prints it and exits with 2."""


def check_positive(value: float, name: str) -> float:
    """Return `value` if it is a finite number > 0, else raise ConfigError."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def check_spd(matrix: torch.Tensor, name: str, dim: int | None = None) -> torch.Tensor:
    """Return `matrix` [D, D] if it is symmetric positive definite (and D == dim when given)."""
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ConfigError(f"{name} must be a square matrix, got shape {tuple(matrix.shape)}")
    if dim is not None and matrix.shape[0] != dim:
        raise ConfigError(
            f"{name} is {matrix.shape[0]}x{matrix.shape[0]} but the dimension is {dim}"
        )
    if not torch.isfinite(matrix).all():
        raise ConfigError(f"{name} has NaN or inf entries")
    scale = matrix.abs().max().clamp_min(1e-12)
    if not torch.allclose(matrix, matrix.T, atol=1e-6 * float(scale)):
        gap = float((matrix - matrix.T).abs().max())
        raise ConfigError(f"{name} must be symmetric, but max |A - Aᵀ| is {gap:.4g}")
    eig_min = float(torch.linalg.eigvalsh(matrix.double()).min())
    if eig_min <= 0:
        raise ConfigError(
            f"{name} must be positive definite, its smallest eigenvalue is {eig_min:.4g}"
        )
    return matrix


def check_finite(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """Return `tensor` if it has no NaN or inf, else raise ConfigError naming how many. A finite
    sum proves the entries finite in one pass (NaN and inf propagate through it); only a
    non-finite sum, from bad entries or an overflow, has the entries looked at one by one."""
    if torch.isfinite(tensor.sum()):
        return tensor
    bad = ~torch.isfinite(tensor)
    if bad.any():
        raise ConfigError(f"{name} has {int(bad.sum())} NaN or inf values")
    return tensor


def parse_matrix(text: str, name: str) -> torch.Tensor:
    """A matrix [D, D] from "a,b;c,d" (rows split by ';', entries by ',') or a .npy file path."""
    if text.endswith(".npy"):
        import numpy as np

        try:
            return torch.as_tensor(np.load(text), dtype=torch.float64)
        except (OSError, ValueError) as error:
            raise ConfigError(f"cannot read {name} from {text!r}: {error}") from None
    try:
        rows = [[float(v) for v in row.split(",")] for row in text.strip().split(";")]
    except ValueError:
        raise ConfigError(
            f"{name} must look like '2,0.5;0.5,1' (rows split by ';') or be a .npy path, "
            f"got {text!r}"
        ) from None
    if len({len(row) for row in rows}) != 1:
        raise ConfigError(f"{name} rows have different lengths: {text!r}")
    return torch.tensor(rows, dtype=torch.float64)
