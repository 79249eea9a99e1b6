"""Transition datasets (s, a, r, s', terminated, truncated): validation, .npz storage, and the
supervised (x, y) view that dynamics models train on."""

from __future__ import annotations

import io
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from mbrl_bilevel.data import Dataset
from mbrl_bilevel.runs import atomic_write_bytes
from mbrl_bilevel.validation import ConfigError


@dataclass(frozen=True)
class Transitions:
    """N transitions as numpy arrays.

    observations [N, O] and next_observations [N, O] float32, actions [N, A] float32,
    rewards [N] float32, terminations [N] bool (the MDP ended), truncations [N] bool (time limit).
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_observations: np.ndarray
    terminations: np.ndarray
    truncations: np.ndarray

    def __post_init__(self):
        n = len(self.observations)
        if n == 0:
            raise ConfigError("the transition dataset is empty")
        for field in fields(self):
            array = getattr(self, field.name)
            if len(array) != n:
                raise ConfigError(
                    f"{field.name} has {len(array)} rows but observations has {n}: they must match"
                )
        if self.observations.ndim != 2 or self.actions.ndim != 2:
            raise ConfigError(
                f"observations and actions must be 2-D [N, dim], got {self.observations.shape} "
                f"and {self.actions.shape}"
            )
        if self.next_observations.shape != self.observations.shape:
            raise ConfigError(
                f"next_observations has shape {self.next_observations.shape} but observations "
                f"has {self.observations.shape}"
            )
        for name in ("observations", "actions", "rewards", "next_observations"):
            bad = ~np.isfinite(getattr(self, name))
            if bad.any():
                rows = np.unique(np.nonzero(bad)[0])
                raise ConfigError(
                    f"{name} has {int(bad.sum())} NaN or inf values (first rows: {rows[:5].tolist()})"
                )

    def __len__(self) -> int:
        return len(self.observations)

    @property
    def obs_dim(self) -> int:
        return self.observations.shape[1]

    @property
    def action_dim(self) -> int:
        return self.actions.shape[1]

    def subset(self, index: np.ndarray) -> Transitions:
        return Transitions(*(getattr(self, f.name)[index] for f in fields(self)))

    @classmethod
    def concatenate(cls, parts: list[Transitions]) -> Transitions:
        if not parts:
            raise ConfigError("nothing to concatenate: no transition datasets given")
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))

    def model_dataset(self, delta: bool = True, reward: bool = False) -> Dataset:
        """x = [s, a] of shape [N, O + A]; y = s' - s (delta=True) or s' [N, O], with the reward r as a
        last column [N, O + 1] when `reward`; float32 tensors."""
        x = np.concatenate([self.observations, self.actions], axis=1)
        y = self.next_observations - self.observations if delta else self.next_observations
        if reward:
            y = np.concatenate([y, self.rewards[:, None]], axis=1)
        return Dataset(
            torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
        )

    def save_npz(self, path: str | Path) -> None:
        """Write all arrays to one compressed .npz file, atomically."""
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **{f.name: getattr(self, f.name) for f in fields(self)})
        atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load_npz(cls, path: str | Path) -> Transitions:
        """Read a file written by save_npz (or any .npz with the same array names)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"no transition dataset at {path}")
        with np.load(path) as archive:
            missing = [f.name for f in fields(cls) if f.name not in archive]
            if missing:
                raise ConfigError(f"{path} lacks the arrays {missing}")
            return cls(
                observations=archive["observations"].astype(np.float32),
                actions=archive["actions"].astype(np.float32),
                rewards=archive["rewards"].astype(np.float32),
                next_observations=archive["next_observations"].astype(np.float32),
                terminations=archive["terminations"].astype(bool),
                truncations=archive["truncations"].astype(bool),
            )
