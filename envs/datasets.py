"""Store and load Transitions as .npz files or Minari datasets.

A name ending in .npz is a file path; anything else is a Minari dataset id such as
`halfcheetah/random-v0` or `mujoco/halfcheetah/medium-v0`, kept under a Minari root folder:
`data_dir` when given, else $MINARI_DATASETS_PATH, else ~/.minari/datasets. Local datasets are
written with Minari's own create_dataset_from_buffers; published ones load when present under
the root (or when Minari can download them).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gymnasium as gym
import minari
import numpy as np
from minari.data_collector import EpisodeBuffer
from minari.dataset.minari_dataset import parse_dataset_id
from minari.storage import get_dataset_path

from mbrl_bilevel.transitions import Transitions
from mbrl_bilevel.validation import ConfigError


def is_npz(name: str | Path) -> bool:
    return str(name).endswith(".npz")


def save_transitions(
    transitions: Transitions,
    out: str,
    env_id: str | None = None,
    data_dir: str | Path | None = None,
) -> str:
    """Write to `out` (.npz path or Minari dataset id) and return where it went."""
    if is_npz(out):
        transitions.save_npz(out)
        return str(Path(out))
    dataset = save_minari(transitions, out, env_id=env_id, data_dir=data_dir)
    return f"Minari dataset {out} ({dataset.storage.data_path})"


def load_transitions(
    source: str, data_dir: str | Path | None = None, download: bool = True
) -> Transitions:
    """Read a .npz path or a Minari dataset id (downloading it if missing and `download`)."""
    if is_npz(source):
        return Transitions.load_npz(source)
    return load_minari(source, data_dir=data_dir, download=download)


def check_destination(out: str, data_dir: str | Path | None = None) -> None:
    """Raise ConfigError unless `out` is a .npz path or a Minari id that does not exist yet."""
    if is_npz(out):
        return
    check_minari_id(out)
    with minari_root(data_dir) as root:
        if get_dataset_path(out).exists():
            raise ConfigError(
                f"Minari dataset {out!r} already exists in {root}; choose another id or version"
            )


def check_minari_id(name: str) -> None:
    """Raise ConfigError unless `name` parses as a Minari dataset id."""
    try:
        parse_dataset_id(name)
    except ValueError:
        raise ConfigError(
            f"{name!r} is neither a .npz path nor a Minari dataset id "
            "((namespace/)name-v<version>, e.g. halfcheetah/random-v0)"
        ) from None


@contextmanager
def minari_root(data_dir: str | Path | None) -> Iterator[Path]:
    """Point Minari at `data_dir` (if given) for the duration; yields the root folder.

    Minari reads its root from $MINARI_DATASETS_PATH, so this sets the variable of the process
    (not thread-safe) and restores it afterwards.
    """
    previous = os.environ.get("MINARI_DATASETS_PATH")
    if data_dir is not None:
        os.environ["MINARI_DATASETS_PATH"] = str(Path(data_dir).resolve())
    try:
        yield get_dataset_path()
    finally:
        if previous is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous


def episode_bounds(transitions: Transitions) -> list[tuple[int, int]]:
    """[start, stop) row ranges of the episodes (each ends at a termination or truncation).

    Raises ConfigError when rows are not consecutive steps (s'_i != s_{i+1} inside an episode),
    which Minari's episode layout cannot represent.
    """
    done = transitions.terminations | transitions.truncations
    if not done[-1]:
        raise ConfigError(
            "the last transition ends no episode (neither terminated nor truncated); "
            "Minari datasets need whole episodes"
        )
    ends = np.flatnonzero(done) + 1
    starts = np.concatenate([[0], ends[:-1]])
    inside = ~done[:-1]
    broken = inside & (transitions.next_observations[:-1] != transitions.observations[1:]).any(-1)
    if broken.any():
        raise ConfigError(
            f"rows {np.flatnonzero(broken)[:5].tolist()} are not followed by their next "
            "observation: the transitions are not whole episodes; save them as .npz instead"
        )
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def save_minari(
    transitions: Transitions,
    dataset_id: str,
    env_id: str | None = None,
    data_dir: str | Path | None = None,
) -> minari.MinariDataset:
    """Create the local Minari dataset `dataset_id` (it must not exist yet) and return it.

    With `env_id` the dataset records the env spec (Minari can recreate the env); without it,
    unbounded Box spaces of the data's shapes are stored.
    """
    buffers = [
        EpisodeBuffer(
            id=index,
            observations=np.concatenate(
                [
                    transitions.observations[start:stop],
                    transitions.next_observations[stop - 1 : stop],
                ]
            ),
            actions=transitions.actions[start:stop],
            rewards=transitions.rewards[start:stop],
            terminations=transitions.terminations[start:stop],
            truncations=transitions.truncations[start:stop],
            infos={},
        )
        for index, (start, stop) in enumerate(episode_bounds(transitions))
    ]
    spaces = {}
    if env_id is None:
        spaces = {
            "observation_space": gym.spaces.Box(
                -np.inf, np.inf, (transitions.obs_dim,), np.float32
            ),
            "action_space": gym.spaces.Box(-np.inf, np.inf, (transitions.action_dim,), np.float32),
        }
    with minari_root(data_dir), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="minari")  # metadata advice
        try:
            return minari.create_dataset_from_buffers(
                dataset_id,
                buffers,
                env=env_id,
                algorithm_name="mbrl-bilevel collect",
                description=f"{len(transitions)} transitions from {env_id or 'an unnamed env'}",
                **spaces,
            )
        except ValueError as error:  # malformed id, or the dataset exists already
            raise ConfigError(f"cannot create Minari dataset {dataset_id!r}: {error}") from None


def load_minari(
    dataset_id: str, data_dir: str | Path | None = None, download: bool = True
) -> Transitions:
    """All episodes of a Minari dataset as Transitions (observations must be flat arrays)."""
    with minari_root(data_dir) as root:
        check_minari_id(dataset_id)
        if not (get_dataset_path(dataset_id) / "data").exists():
            if not download:
                raise ConfigError(f"Minari dataset {dataset_id!r} is not in {root}")
            fetch_minari(dataset_id, root)
        dataset = minari.load_dataset(dataset_id)
        parts = [episode_transitions(episode, dataset_id) for episode in dataset.iterate_episodes()]
    return Transitions.concatenate(parts)


def fetch_minari(dataset_id: str, root: Path) -> None:
    """Download a published dataset into `root`, or raise ConfigError saying how to get it."""
    try:
        minari.download_dataset(dataset_id)
    except Exception as error:  # Minari raises many kinds (ImportError, ValueError, network)
        raise ConfigError(
            f"Minari dataset {dataset_id!r} is not in {root} and could not be downloaded "
            f"({type(error).__name__}: {error}). On a machine with network access run "
            f"`minari download {dataset_id}` and copy its folder to {root / dataset_id}, or "
            "point --data-dir at a folder that holds it."
        ) from None


def episode_transitions(episode: minari.EpisodeData, dataset_id: str) -> Transitions:
    """One Minari episode (observations [T + 1, O]) as T transitions."""
    observations = episode.observations
    if not isinstance(observations, np.ndarray) or observations.ndim != 2:
        raise ConfigError(
            f"Minari dataset {dataset_id!r} has structured (dict or tuple) or non-flat "
            "observations; only flat vector observations are supported"
        )
    return Transitions(
        observations=observations[:-1].astype(np.float32),
        actions=np.asarray(episode.actions, dtype=np.float32),
        rewards=np.asarray(episode.rewards, dtype=np.float32),
        next_observations=observations[1:].astype(np.float32),
        terminations=np.asarray(episode.terminations, dtype=bool),
        truncations=np.asarray(episode.truncations, dtype=bool),
    )
