"""Acceptance of sweeps with the real `train`: 2 envs × 2 dynamics losses × 2 seeds, tiny
budgets, on the local backend (interrupted, then completed) and on Ray; report writes the table
and the figures. Slow: 8 agent runs each."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

SPEC = """
command = "train"
name = "{name}"
out_dir = "{out}"
[options]
preset = "tiny"
steps = 100
eval_every = 50
eval_episodes = 1
[grid]
env = ["mbrl_bilevel/PointMass-v0", "InvertedPendulum-v5"]
dynamics_loss = ["nll", "mse"]
seed = [0, 1]
"""


def write_spec(tmp_path, name):
    spec = tmp_path / f"{name}.toml"
    spec.write_text(SPEC.format(name=name, out=tmp_path / "runs"))
    return spec


def sweep(*args, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "mbrl_bilevel.cli", "sweep", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "MUJOCO_GL": "egl"},
        **kwargs,
    )


def check_report(folder):
    report = (folder / "report" / "report.md").read_text()
    for env in ("InvertedPendulum-v5", "mbrl_bilevel/PointMass-v0"):
        for loss in ("nll", "mse"):
            row = next(line for line in report.splitlines() if f"| {env} | {loss} |" in line)
            assert row.endswith("| 2 |"), row  # two seeds per group
    figures = sorted(p.name for p in (folder / "report").glob("curves_train_*.png"))
    assert figures == ["curves_train_InvertedPendulum-v5.png", "curves_train_PointMass-v0.png"]
    assert list((folder / "report" / "hparams" / "train").glob("*/events.out.tfevents.*"))
    return report


@pytest.mark.slow
def test_interrupted_local_sweep_completes_only_the_missing_runs(tmp_path):
    spec = write_spec(tmp_path, "acc")
    folder = tmp_path / "runs" / "acc"
    process = sweep(spec, "--jobs", "2", start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # two runs finished and a third has a checkpoint
        done = list(folder.glob("*/summary.json"))
        started = [p.parent.parent for p in folder.glob("*/checkpoints/agent.pt")]
        if len(done) >= 2 and any(not (run / "summary.json").exists() for run in started):
            break
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C on the sweep and its runs
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 130, output
    finished = {p.parent.name: p.stat().st_mtime for p in folder.glob("*/summary.json")}
    interrupted = [
        p.parent.parent.name
        for p in folder.glob("*/checkpoints/agent.pt")
        if p.parent.parent.name not in finished
    ]
    begun = [p.parent.name for p in folder.glob("*/config.json") if p.parent.name not in finished]
    assert 2 <= len(finished) < 8 and interrupted
    status = json.loads((folder / "status.json").read_text())["runs"]
    assert {e["state"] for e in status.values()} <= {"done", "interrupted"}

    process = sweep(spec, "--jobs", "2")
    output = process.communicate(timeout=900)[0]
    assert process.returncode == 0, output
    left = 8 - len(finished) - len(begun)
    assert f"{len(finished)} finished, {len(begun)} to resume, {left} to start" in output
    assert f"{8 - len(finished)} runs done now, {len(finished)} finished before" in output
    assert {p.parent.name for p in folder.glob("*/summary.json")} == {name for name in status}
    for name, mtime in finished.items():  # finished runs were not run again
        assert (folder / name / "summary.json").stat().st_mtime == mtime
    for name in interrupted:
        assert "resumed at step" in (folder / "logs" / f"{name}.log").read_text()
    check_report(folder)


@pytest.mark.slow
def test_ray_sweep_runs_every_point_and_reports(tmp_path):
    pytest.importorskip("ray")
    spec = write_spec(tmp_path, "ray")
    started = time.perf_counter()
    process = sweep(spec, "--backend", "ray", "--jobs", "2")
    output = process.communicate(timeout=1200)[0]
    assert process.returncode == 0, output
    assert "8 runs done now, 0 finished before, 0 failed" in output
    folder = tmp_path / "runs" / "ray"
    report = check_report(folder)
    print(f"\nRay sweep, 8 runs: {time.perf_counter() - started:.0f} s\n{report}")
