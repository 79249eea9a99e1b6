import numpy as np
import pytest

from mbrl_bilevel.transitions import Transitions
from mbrl_bilevel.validation import ConfigError


def make(n=10, obs=3, act=2, seed=0):
    rng = np.random.default_rng(seed)
    o = rng.normal(size=(n, obs)).astype(np.float32)
    return Transitions(
        o,
        rng.normal(size=(n, act)).astype(np.float32),
        rng.normal(size=n).astype(np.float32),
        o + 0.1,
        np.zeros(n, bool),
        np.zeros(n, bool),
    )


def test_npz_round_trip_and_model_view(tmp_path):
    data = make()
    data.save_npz(tmp_path / "d.npz")
    loaded = Transitions.load_npz(tmp_path / "d.npz")
    assert np.array_equal(loaded.observations, data.observations)
    view = loaded.model_dataset(delta=True)
    assert view.x.shape == (10, 5) and view.y.shape == (10, 3)
    assert np.allclose(view.y.numpy(), 0.1, atol=1e-6)
    assert len(Transitions.concatenate([data, data.subset(np.arange(3))])) == 13


def test_bad_transitions_are_named():
    data = make()
    with pytest.raises(ConfigError, match="empty"):
        data.subset(np.arange(0))
    bad = data.observations.copy()
    bad[4, 1] = np.nan
    with pytest.raises(ConfigError, match="observations has 1 NaN"):
        Transitions(
            bad,
            data.actions,
            data.rewards,
            data.next_observations,
            data.terminations,
            data.truncations,
        )
    with pytest.raises(ConfigError, match="next_observations has shape"):
        Transitions(
            data.observations,
            data.actions,
            data.rewards,
            data.next_observations[:, :2],
            data.terminations,
            data.truncations,
        )
    with pytest.raises(ConfigError, match="actions has 9 rows"):
        Transitions(
            data.observations,
            data.actions[:9],
            data.rewards,
            data.next_observations,
            data.terminations,
            data.truncations,
        )
    with pytest.raises(ConfigError, match="no transition dataset"):
        Transitions.load_npz("/nonexistent.npz")
