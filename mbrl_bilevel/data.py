"""Supervised datasets of (x, y) pairs, their splits and minibatches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from mbrl_bilevel.validation import ConfigError, check_finite


@dataclass(frozen=True)
class Dataset:
    """Inputs x [N, in] and targets y [N, D] (float) or [N] (class indices)."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self):
        if self.x.shape[0] != self.y.shape[0]:
            raise ConfigError(
                f"x has {self.x.shape[0]} rows but y has {self.y.shape[0]}: they must match"
            )
        check_finite(self.x, "inputs x")
        if self.y.is_floating_point():
            check_finite(self.y, "targets y")

    def __len__(self) -> int:
        return self.x.shape[0]

    def subset(self, index: torch.Tensor) -> Dataset:
        return Dataset(self.x[index], self.y[index])

    def batches(self, batch_size: int | None, generator: torch.Generator) -> Iterator[Dataset]:
        """One epoch of shuffled minibatches (the whole set once when batch_size is None)."""
        if batch_size is None or batch_size >= len(self):
            yield self
            return
        order = torch.randperm(len(self), generator=generator)
        for start in range(0, len(self), batch_size):
            yield self.subset(order[start : start + batch_size])


def random_split(
    data: Dataset, fractions: Sequence[float], generator: torch.Generator
) -> list[Dataset]:
    """Split into len(fractions) disjoint random parts; the last part takes the remainder."""
    if any(f <= 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
        raise ConfigError(f"split fractions must be > 0 and sum to <= 1, got {fractions}")
    order = torch.randperm(len(data), generator=generator)
    sizes = [int(round(f * len(data))) for f in fractions]
    if sum(fractions) > 1 - 1e-9:
        sizes[-1] = len(data) - sum(sizes[:-1])
    parts, start = [], 0
    for size in sizes:
        if size <= 0:
            raise ConfigError(f"split {fractions} of {len(data)} rows leaves an empty part")
        parts.append(data.subset(order[start : start + size]))
        start += size
    return parts
