"""Data collection, .npz and local-Minari round trips, the missing-dataset message, the CLI."""

import dataclasses

import minari
import numpy as np
import pytest

from envs import POINT_MASS_ID, make_env
from envs.collect import collect, collect_with_sac
from envs.datasets import load_minari, load_transitions, save_transitions
from mbrl_bilevel.cli import main
from mbrl_bilevel.transitions import Transitions
from mbrl_bilevel.validation import ConfigError


def assert_same(a: Transitions, b: Transitions):
    for field in dataclasses.fields(Transitions):
        np.testing.assert_array_equal(getattr(a, field.name), getattr(b, field.name))


@pytest.fixture(scope="module")
def point_mass_data() -> Transitions:
    return collect(make_env(POINT_MASS_ID), 120, seed=0, progress=False)


def test_random_collection_delimits_episodes(point_mass_data):
    data = point_mass_data
    assert len(data) == 120 and data.obs_dim == 2 and data.action_dim == 2
    assert data.observations.dtype == np.float32
    # time limit at 50 and 100; the unfinished last episode is marked truncated
    assert np.flatnonzero(data.truncations).tolist() == [49, 99, 119]
    assert not data.terminations.any()
    np.testing.assert_array_equal(data.next_observations[:49], data.observations[1:50])
    assert np.abs(data.actions).max() <= 1 and np.abs(data.actions).mean() > 0.3


def test_collection_is_seeded(point_mass_data):
    assert_same(collect(make_env(POINT_MASS_ID), 120, seed=0, progress=False), point_mass_data)
    other = collect(make_env(POINT_MASS_ID), 120, seed=1, progress=False)
    assert not np.array_equal(other.actions, point_mass_data.actions)
    seeded_by_make_env = [collect(make_env(POINT_MASS_ID, seed=5), 20) for _ in range(2)]
    assert_same(*seeded_by_make_env)


def test_collection_restarts_after_termination():
    data = collect(make_env("InvertedPendulum-v5"), 100, seed=0, progress=False)
    ends = np.flatnonzero(data.terminations)
    assert len(ends) >= 2
    assert np.abs(data.next_observations[ends, 1]).min() > 0.2  # the pole fell
    assert np.abs(data.observations[ends[0] + 1, 1]) < 0.02  # a fresh, nearly upright start


def test_sac_collection_returns_transitions():
    env = make_env(POINT_MASS_ID)
    data = collect_with_sac(env, steps=60, sac_steps=120, seed=0, progress=False)
    assert isinstance(data, Transitions) and len(data) == 60
    random = collect(make_env(POINT_MASS_ID), 60, seed=0, progress=False)
    assert not np.array_equal(data.actions, random.actions)


def test_npz_round_trip(point_mass_data, tmp_path):
    where = save_transitions(point_mass_data, str(tmp_path / "d.npz"))
    assert where.endswith("d.npz")
    assert_same(load_transitions(str(tmp_path / "d.npz")), point_mass_data)


def test_local_minari_round_trip(point_mass_data, tmp_path):
    save_transitions(point_mass_data, "pointmass/random-v0", POINT_MASS_ID, data_dir=tmp_path)
    assert (tmp_path / "pointmass" / "random-v0" / "data").is_dir()
    assert_same(load_transitions("pointmass/random-v0", data_dir=tmp_path), point_mass_data)
    with pytest.raises(ConfigError, match="already exists"):
        save_transitions(point_mass_data, "pointmass/random-v0", POINT_MASS_ID, data_dir=tmp_path)


def test_minari_dataset_keeps_terminal_states_and_env_spec(tmp_path):
    data = collect(make_env("InvertedPendulum-v5"), 60, seed=0, progress=False)
    save_transitions(data, "mujoco/pendulum/random-v0", "InvertedPendulum-v5", data_dir=tmp_path)
    assert_same(load_transitions("mujoco/pendulum/random-v0", data_dir=tmp_path), data)
    dataset = minari.MinariDataset(tmp_path / "mujoco" / "pendulum" / "random-v0" / "data")
    assert dataset.env_spec.id == "InvertedPendulum-v5"
    assert dataset.total_episodes == int((data.terminations | data.truncations).sum())


def test_transitions_that_are_not_episodes_cannot_become_minari(point_mass_data, tmp_path):
    gap = point_mass_data.subset(np.delete(np.arange(len(point_mass_data)), 10))
    with pytest.raises(ConfigError, match=r"rows \[9\] are not followed by their next observation"):
        save_transitions(gap, "pointmass/gap-v0", data_dir=tmp_path)
    with pytest.raises(ConfigError, match="the last transition ends no episode"):
        save_transitions(point_mass_data.subset(np.arange(30)), "pm/cut-v0", data_dir=tmp_path)


def test_missing_dataset_that_cannot_be_downloaded_says_what_to_do(tmp_path, monkeypatch):
    def offline(dataset_id, force_download=False):
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(minari, "download_dataset", offline)
    with pytest.raises(ConfigError) as error:
        load_minari("mujoco/halfcheetah/medium-v0", data_dir=tmp_path)
    message = str(error.value)
    assert "'mujoco/halfcheetah/medium-v0' is not in" in message and str(tmp_path) in message
    assert "network unreachable" in message
    assert "minari download mujoco/halfcheetah/medium-v0" in message
    with pytest.raises(ConfigError, match="is not in"):
        load_minari("mujoco/halfcheetah/medium-v0", data_dir=tmp_path, download=False)


def test_the_install_carries_the_client_of_minaris_default_remote():
    """Published datasets live on Minari's default remote (Hugging Face): without its client
    (the minari[hf] extra) every download fails with an ImportError, network or not."""
    from minari.storage.remotes import DEFAULT_REMOTE, get_cloud_storage

    storage = get_cloud_storage(DEFAULT_REMOTE)  # raises ImportError without the client; no request
    assert storage.name == DEFAULT_REMOTE.split("://", 1)[1]


def test_bad_dataset_names_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="neither a .npz path nor a Minari dataset id"):
        load_transitions("data.csv", data_dir=tmp_path)
    with pytest.raises(ConfigError, match="no transition dataset"):
        load_transitions(str(tmp_path / "missing.npz"))


def test_cli_collect_writes_a_dataset(tmp_path, capsys):
    out = tmp_path / "pm.npz"
    main(["collect", "--env", POINT_MASS_ID, "--steps", "70", "--out", str(out)])
    assert "collected 70 transitions (2 episodes" in capsys.readouterr().out
    assert len(Transitions.load_npz(out)) == 70


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--env", "CartPole-v1"], "Discrete(2)"),
        (["--env", "Nope-v9"], "'Nope-v9'"),
        (["--out", "x.csv"], "'x.csv' is neither"),
        (["--steps", "0"], "--steps must be"),
    ],
)
def test_cli_collect_user_mistakes_exit_2(args, message, tmp_path, capsys):
    argv = ["collect", "--out", str(tmp_path / "x.npz"), "--steps", "10", *args]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
