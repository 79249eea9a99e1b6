"""The offline dynamics benchmark: rollout windows, reward matrices, metrics, the command."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.distributions import Independent, Normal

from mbrl_bilevel.cli import main
from mbrl_bilevel.data import Dataset
from mbrl_bilevel.dynamics import DynamicsConfig, rollout_rmse, rollout_starts
from mbrl_bilevel.learners import DYNAMICS_LOSSES
from mbrl_bilevel.learners import fixed_reward_matrix as reward_matrix
from mbrl_bilevel.train_bench import TrainBenchConfig, linear_flops_per_step, run_train_bench
from mbrl_bilevel.training import heldout_metrics
from mbrl_bilevel.transitions import Transitions
from mbrl_bilevel.validation import ConfigError

A_TRUE = torch.tensor([[0.0, 1.0, 0.0], [-1.0, -0.1, 0.0], [0.0, 0.0, -0.5]])
B_TRUE = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])


def linear_system(episodes=6, length=50, noise=0.05, seed=0) -> Transitions:
    """s' = s + 0.1·(A s + B a) + ε with heteroscedastic noise, episodes truncated at `length`."""
    rng = np.random.default_rng(seed)
    A, Bm = A_TRUE.numpy().astype(np.float64), B_TRUE.numpy().astype(np.float64)
    parts = []
    for _ in range(episodes):
        s = rng.normal(size=3)
        obs, act, nxt = [], [], []
        for _ in range(length):
            a = rng.uniform(-1, 1, size=2)
            s2 = s + 0.1 * (A @ s + Bm @ a) + noise * (0.2 + np.abs(s[0])) * rng.normal(size=3)
            obs.append(s), act.append(a), nxt.append(s2)
            s = s2
        trunc = np.zeros(length, bool)
        trunc[-1] = True
        parts.append(
            Transitions(
                np.array(obs, np.float32),
                np.array(act, np.float32),
                np.zeros(length, np.float32),
                np.array(nxt, np.float32),
                np.zeros(length, bool),
                trunc,
            )
        )
    return Transitions.concatenate(parts)


def test_rollout_windows_stay_inside_episodes():
    data = linear_system(episodes=2, length=10)
    starts = rollout_starts(data, horizon=4)
    assert starts.tolist() == [*range(0, 7), *range(10, 17)]
    assert rollout_starts(data, horizon=1).tolist() == list(range(20))


def test_rollout_rmse_is_zero_for_the_true_model_and_grows_with_bias():
    data = linear_system(noise=0.0)

    def true_delta(x, bias=0.0):
        mean = 0.1 * (x[:, :3] @ A_TRUE.T + x[:, 3:] @ B_TRUE.T) + bias
        return Independent(Normal(mean, torch.ones_like(mean)), 1)

    starts = rollout_starts(data, 10)
    assert rollout_rmse(true_delta, data, starts, 10, delta=True) < 1e-5
    biased = rollout_rmse(lambda x: true_delta(x, 0.01), data, starts, 10, delta=True)
    assert 0.05 < biased < 0.2  # about 10 steps × 0.01, propagated through the dynamics


def test_reward_matrices_of_fixed_pg_strategies():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 2, generator=g)
    y = torch.cat([3 * x[:, :1], -x[:, 1:]], 1) + torch.randn(4000, 2, generator=g) * 0.5
    data, lam = Dataset(x, y), 0.8
    torch.testing.assert_close(reward_matrix("pg-identity", data, lam), torch.eye(2))
    scaled = reward_matrix("pg-scaled", data, lam)  # residual variance 0.25 per dim
    torch.testing.assert_close(scaled, lam / (2 * 0.25) * torch.eye(2), rtol=0.05, atol=0)
    raw = reward_matrix("pg-raw-sigma", data, lam)  # covariance of the targets themselves
    torch.testing.assert_close(raw, lam / 2 * torch.linalg.inv(torch.cov(y.T)), rtol=1e-4, atol=0)


def test_metrics_calibration_of_a_true_gaussian():
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(20000, 3, generator=g), torch.rand(20000, 3, generator=g) + 0.5
    y = mean + std * torch.randn(20000, 3, generator=g)
    metrics = heldout_metrics(Independent(Normal(mean, std), 1), y)
    assert metrics["cal1"] == pytest.approx(0.683, abs=0.01)
    assert metrics["cal2"] == pytest.approx(0.954, abs=0.01)
    assert metrics["rmse"] == pytest.approx(float(std.pow(2).mean().sqrt()), rel=0.02)
    expected_nll = float(0.5 * np.log(2 * np.pi * np.e) + std.log().mean())
    assert metrics["nll"] == pytest.approx(expected_nll, abs=0.02)


TINY = ["--seeds", "2", "--jobs", "1", "--members", "3", "--elites", "2", "--hidden", "32,32"]


@pytest.mark.parametrize("protocol", ["default", "paper"])
def test_dynamics_command_writes_run_folder(tmp_path, capsys, protocol):
    path = tmp_path / "lin.npz"
    linear_system().save_npz(path)
    strategies = ",".join(DYNAMICS_LOSSES)
    args = ["dynamics", "--dataset", str(path), "--strategies", strategies, *TINY]
    args += ["--refresh-every", "10"]
    args += ["--steps", "30", "--eval-every", "10", "--protocol", protocol]
    main([*args, "--out-dir", str(tmp_path), "--name", "tiny"])
    run = tmp_path / "tiny"
    assert "run folder: " + str(run) in capsys.readouterr().out
    for name in ("config.json", "summary.json", "metrics.csv", "table.md", "plots/dynamics.png"):
        assert (run / name).is_file(), name
    events = list((run / "tb").glob("pg-scaled-seed1/events.*"))
    assert events and events[0].stat().st_size > 1000  # train/, val/ and test/ scalars
    scalars = EventAccumulator(str(next((run / "tb").glob("bilevel-seed0")))).Reload()
    assert {"solver/residual", "reward/u_eig_min"} <= set(scalars.Tags()["scalars"])
    summary = json.loads((run / "summary.json").read_text())
    assert list(summary["final"]) == strategies.split(",")
    for strategy, numbers in summary["final"].items():
        assert numbers["rmse"]["n"] == 2, strategy
        for key in ("rmse", "nll", "cal1", "cal2", "rollout_rmse"):
            assert np.isfinite(numbers[key]["mean"]), (strategy, key)


def test_without_dataset_the_command_collects_halfcheetah(tmp_path, capsys):
    args = ["dynamics", "--collect-steps", "400", "--strategies", "nll", *TINY, "--seeds", "1"]
    main([*args, "--steps", "10", "--out-dir", str(tmp_path), "--name", "collected"])
    assert "collecting 400 HalfCheetah-v5 random transitions" in capsys.readouterr().out
    summary = json.loads((tmp_path / "collected" / "summary.json").read_text())
    assert (summary["transitions"], summary["obs_dim"], summary["action_dim"]) == (400, 17, 6)


def test_ensemble_learns_the_linear_system_close_to_the_noise_floor(tmp_path):
    path = tmp_path / "lin.npz"
    data = linear_system(episodes=20, length=100, noise=0.01)
    data.save_npz(path)
    config = DynamicsConfig(
        dataset=str(path), strategies="nll", seeds=1, jobs=1, members=3, elites=2,
        hidden="64,64", steps=400, out_dir=str(tmp_path),
    )  # fmt: skip
    from mbrl_bilevel.dynamics import run_study

    _, summary, _ = run_study(config, data)
    delta = data.next_observations - data.observations
    true_mean = 0.1 * (data.observations @ A_TRUE.T.numpy() + data.actions @ B_TRUE.T.numpy())
    noise_rmse = np.sqrt(np.mean((delta - true_mean) ** 2))  # the best any model can do
    assert summary["final"]["nll"]["rmse"]["mean"] < 1.2 * noise_rmse
    assert np.sqrt(np.mean(delta**2)) > 2 * noise_rmse  # ... and the data are not just noise


def write_npz(path, **overrides):
    arrays = {k: v for k, v in np.load(path_of_good(path.parent)).items()}
    arrays.update(overrides)
    np.savez(path, **arrays)
    return path


def path_of_good(folder):
    good = folder / "good.npz"
    if not good.exists():
        linear_system(episodes=1, length=30).save_npz(good)
    return good


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"observations": np.full((30, 3), np.nan, np.float32)}, "observations has 90 NaN or inf"),
        ({"actions": np.full((30, 2), np.inf, np.float32)}, "actions has 60 NaN or inf"),
        ({"next_observations": np.zeros((30, 4), np.float32)}, "next_observations has shape"),
        ({"actions": np.zeros((29, 2), np.float32)}, "actions has 29 rows"),
        (
            {k: np.zeros((0, 3), np.float32) for k in ("observations", "next_observations")}
            | {"actions": np.zeros((0, 2), np.float32), "rewards": np.zeros(0, np.float32)}
            | {"terminations": np.zeros(0, bool), "truncations": np.zeros(0, bool)},
            "dataset is empty",
        ),
    ],
)
def test_bad_datasets_exit_2_naming_the_problem(tmp_path, capsys, overrides, message):
    path = write_npz(tmp_path / "bad.npz", **overrides)
    with pytest.raises(SystemExit) as exit_info:
        main(["dynamics", "--dataset", str(path), "--out-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_dataset_prints_one_line_without_traceback(tmp_path):
    path = write_npz(tmp_path / "bad.npz", rewards=np.full(30, np.nan, np.float32))
    result = subprocess.run(
        [sys.executable, "-m", "mbrl_bilevel.cli", "dynamics", "--dataset", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "mbrl-bilevel: error: rewards has 30 NaN or inf values (first rows: [0, 1, 2, 3, 4])"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "missing.npz"], "no transition dataset at missing.npz"),
        (["--dataset", "x.npz", "--strategies", "mse,foo"], "unknown strategies ['foo']"),
        (["--dataset", "x.npz", "--elites", "9"], "--elites (9) cannot exceed --members (7)"),
        (["--dataset", "x.npz", "--protocol", "nips"], "--protocol must be default or paper"),
    ],
)
def test_bad_options_exit_2(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["dynamics", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_lambda_and_estimator_are_checked():
    with pytest.raises(ConfigError, match="--lam"):
        DynamicsConfig(lam=-1).validate()
    with pytest.raises(ConfigError, match="--estimator"):
        DynamicsConfig(estimator="magic").validate()


def test_train_bench_counts_flops_and_reports_a_share():
    assert linear_flops_per_step(23, 17, (200,) * 4, 7, 256) == 6 * 7 * 256 * 131_400
    config = TrainBenchConfig(strategies="nll,bilevel", hidden="64,64", steps=5, rounds=1)
    rows, context = run_train_bench(config)
    assert context["flops_per_step"] == linear_flops_per_step(23, 17, (64, 64), 7, 256)
    assert [row["strategy"] for row in rows] == ["nll", "bilevel"]
    for row in rows:
        assert row["transitions_per_s"] > 0 and 0 < row["share_of_matmul"] < 2
