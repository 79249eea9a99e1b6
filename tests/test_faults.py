"""Fault injection on `mbrl-bilevel train` (issue 36; docs/guides/faults.md lists each fault):
runs killed at random steps (SIGKILL of a subprocess, or an exception from a callback) and
resumed equal the uninterrupted run; damaged checkpoints fall back to the previous one or stop
with one line; a NaN in a model-training batch and a diverged critic are survived and counted;
a failing write stops with one line and tears nothing; a live run's folder is refused to a
second run."""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents.checkpoints import (
    CHECKPOINT,
    EpisodeCheckpoint,
    previous_path,
    read_checkpoint,
)
from agents.mbpo import MBPO, PRESETS
from envs.make import make_env
from envs.point_mass import POINT_MASS_ID
from mbrl_bilevel.cli import main
from mbrl_bilevel.configs import replace_fields
from mbrl_bilevel.runs import LOCK, CheckedFileError, run_lock

ROOT = Path(__file__).resolve().parents[1]
RUNS = {  # fast runs whose dynamics learners carry a reward update's state across retrainings
    "pets": {"dynamics-loss": "bilevel", "steps": 150, "eval-every": 50, "eval-episodes": 1},
    "mbpo": {
        "dynamics-loss": "pg-plugin-input-beta",
        "steps": 300,
        "eval-every": 60,
        "eval-episodes": 2,
    },
}
KILL_HOOK = """
import os, runpy, signal, sys
from agents.checkpoints import EpisodeCheckpoint
step = int(sys.argv.pop(1))
def kill_at_step(self):
    if self.model.num_timesteps == step:
        os.kill(os.getpid(), signal.SIGKILL)
    return True
EpisodeCheckpoint._on_step = kill_at_step
runpy.run_module("mbrl_bilevel.cli", run_name="__main__", alter_sys=True)
"""
"""`python -c KILL_HOOK <step> train ...` is `python -m mbrl_bilevel.cli train ...` SIGKILLed
after env step <step> (its evaluation done, before its checkpoint)."""
WRITE_KILL_HOOK = """
import os, runpy, signal, sys
saves = int(sys.argv.pop(1))
replace = os.replace
def replace_or_die(src, dst):
    global saves
    if str(src).endswith(".tmp") and str(dst).endswith("agent.pt"):
        if saves == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        saves -= 1
    replace(src, dst)
os.replace = replace_or_die
runpy.run_module("mbrl_bilevel.cli", run_name="__main__", alter_sys=True)
"""
"""`python -c WRITE_KILL_HOOK <n> train ...`: SIGKILLed in checkpoint save n + 1, after the
previous checkpoint was moved aside and before the new one is renamed into place."""


class Killed(BaseException):
    """The crash an in-process run is stopped by (nothing in the toolkit catches it)."""


def train_args(agent: str, out_dir: Path, name: str) -> list[str]:
    options = [f"--{key}={value}" for key, value in RUNS[agent].items()]
    common = ["--env", POINT_MASS_ID, "--agent", agent, "--preset", "tiny", "--no-progress"]
    return ["train", *common, *options, "--out-dir", str(out_dir), "--name", name]


def resume_args(run: Path) -> list[str]:
    return ["train", "--resume", str(run), "--no-progress"]


def sigkill_at(step: int, args: list[str], hook: str = KILL_HOOK) -> None:
    """Run the CLI with `args` in a subprocess and SIGKILL it after env step `step` (with
    WRITE_KILL_HOOK: in checkpoint save `step` + 1)."""
    done = cli(["-c", hook, str(step), *args])
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]


def cli(args: list[str]) -> subprocess.CompletedProcess:
    """`python <args>` in the repository, its output captured."""
    env = dict(os.environ, MUJOCO_GL="egl")
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True
    )


def raise_at(step: int, args: list[str], monkeypatch) -> None:
    """Run the CLI in this process and crash it with Killed after env step `step`."""

    def crash(callback):
        if callback.model.num_timesteps == step:
            raise Killed
        return True

    with monkeypatch.context() as patch:
        patch.setattr(EpisodeCheckpoint, "_on_step", crash)
        with pytest.raises(Killed):
            main(args)


def random_steps(agent: str, count: int) -> list[int]:
    """`count` increasing kill steps, random but the same in every test session."""
    steps = range(1, RUNS[agent]["steps"])
    return sorted(random.Random(f"issue-36-{agent}").sample(steps, count))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted run of each agent."""
    out = tmp_path_factory.mktemp("reference")
    for agent in RUNS:
        main(train_args(agent, out, agent))
    return {agent: out / agent for agent in RUNS}


def checkpoint_leaves(path: Path) -> dict[str, object]:
    """Every tensor, array and value a checkpoint holds, by its path in the state; SAC's zip
    (MBPO) opened into its torch files and its data, less the objects SB3 pickles into that data
    (classes, spaces, schedules: their reprs hold memory addresses, and a loaded SAC keeps its
    own copy of the action space, whose generator nothing draws from)."""
    leaves: dict[str, object] = {}

    def walk(value, key):
        if dataclasses.is_dataclass(value):  # PETS's Transitions
            walk(dataclasses.asdict(value), key)
        elif isinstance(value, dict) and ":serialized:" in value:
            return
        elif isinstance(value, dict):
            for name, item in value.items():
                walk(item, f"{key}/{name}")
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(item, f"{key}/{index}")
        elif isinstance(value, bytes) and value.startswith(b"PK"):
            with zipfile.ZipFile(io.BytesIO(value)) as archive:
                for name in archive.namelist():
                    data = archive.read(name)
                    if name.endswith(".pth"):
                        walk(torch.load(io.BytesIO(data), weights_only=False), f"{key}/{name}")
                    elif name == "data":
                        walk(json.loads(data), f"{key}/data")
        else:
            leaves[key] = value

    walk(read_checkpoint(path), "")
    return leaves


def same_value(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return type(a) is type(b) and a == b


def assert_same_run(run: Path, reference: Path) -> None:
    """The evaluations, training curve, model log, summary counts and final checkpoint of `run`
    equal the reference's."""
    ours, theirs = (
        np.load(run / "eval/evaluations.npz"),
        np.load(reference / "eval/evaluations.npz"),
    )
    for key in ("timesteps", "results", "ep_lengths"):
        assert np.array_equal(ours[key], theirs[key]), key
    for name in ("metrics.csv", "model.csv"):
        assert (run / name).read_bytes() == (reference / name).read_bytes(), name
    summaries = [json.loads((folder / "summary.json").read_text()) for folder in (run, reference)]
    for key in ("env_steps", "episodes", "final_eval_return", "faults"):
        assert summaries[0][key] == summaries[1][key], key
    leaves, expected = (
        checkpoint_leaves(run / CHECKPOINT),
        checkpoint_leaves(reference / CHECKPOINT),
    )
    assert leaves.keys() == expected.keys()
    differ = [key for key in leaves if not same_value(leaves[key], expected[key])]
    assert not differ


@pytest.mark.parametrize("agent", sorted(RUNS))
def test_killed_at_three_random_steps_resumes_exactly(agent, reference, tmp_path, monkeypatch):
    """SIGKILL at the first step, crashes at the next two, a resume after each: the evaluations,
    curves and final weights are the uninterrupted run's."""
    first, *others = random_steps(agent, 3)
    run = tmp_path / agent
    sigkill_at(first, train_args(agent, tmp_path, agent))
    for step in others:
        raise_at(step, resume_args(run), monkeypatch)
    main(resume_args(run))
    assert_same_run(run, reference[agent])


@pytest.mark.slow
@pytest.mark.parametrize("agent", sorted(RUNS))
def test_sigkilled_five_times_resumes_exactly(agent, reference, tmp_path):
    """Five SIGKILLs of the CLI at random steps, each resumed by another process."""
    first, *others = random_steps(agent, 5)
    run = tmp_path / agent
    sigkill_at(first, train_args(agent, tmp_path, agent))
    for step in others:
        sigkill_at(step, resume_args(run))
    resumed = cli(["-m", "mbrl_bilevel.cli", *resume_args(run)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(run, reference[agent])


@pytest.mark.slow
def test_sigkill_inside_a_checkpoint_write_resumes_exactly(reference, tmp_path):
    """Killed in the fourth save (step 200), between moving the checkpoint of step 150 aside and
    renaming the new one into place: the newest is missing, the run resumes from the previous
    one, and the temporary file left behind is removed."""
    run = tmp_path / "mbpo"
    sigkill_at(3, train_args("mbpo", tmp_path, "mbpo"), WRITE_KILL_HOOK)
    assert not (run / CHECKPOINT).exists() and list(run.rglob(".*.tmp"))
    resumed = cli(["-m", "mbrl_bilevel.cli", *resume_args(run)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{run / CHECKPOINT} is missing; resuming from" in resumed.stderr
    assert "resumed at step 150" in resumed.stdout
    assert not list(run.rglob(".*.tmp"))
    assert_same_run(run, reference["mbpo"])


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Path:
    """An MBPO run crashed after step 230: checkpoints at steps 200 (newest) and 150."""
    out = tmp_path_factory.mktemp("interrupted")
    with pytest.MonkeyPatch.context() as monkeypatch:
        raise_at(230, train_args("mbpo", out, "mbpo"), monkeypatch)
    return out / "mbpo"


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # one bit flipped in the payload
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "bit-flipped"])
def test_damaged_newest_checkpoint_resumes_from_the_previous(
    how, interrupted, reference, tmp_path, capsys
):
    run = Path(shutil.copytree(interrupted, tmp_path / "mbpo"))
    newest, previous = run / CHECKPOINT, previous_path(run / CHECKPOINT)
    damage(newest, how)
    main(resume_args(run))
    captured = capsys.readouterr()
    (warning,) = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    problem = "is truncated" if how == "truncated" else "is corrupt"
    assert f"{newest} {problem}" in warning and f"resuming from {previous}" in warning
    assert f"resumed at step 150 from {previous}" in captured.out
    assert (run / f"{CHECKPOINT}.unusable").is_file()  # set aside, not kept as the previous one
    assert_same_run(run, reference["mbpo"])


def test_no_usable_checkpoint_stops_with_one_line(interrupted, tmp_path, capsys):
    run = Path(shutil.copytree(interrupted, tmp_path / "mbpo"))
    for path in (run / CHECKPOINT, previous_path(run / CHECKPOINT)):
        damage(path, "truncated")
    with pytest.raises(SystemExit) as exit_info:
        main(resume_args(run))
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("mbrl-bilevel: error: no usable checkpoint: ")
    assert str(run / CHECKPOINT) in line and str(previous_path(run / CHECKPOINT)) in line
    result = cli(["-m", "mbrl_bilevel.cli", *resume_args(run)])  # the same line, no traceback
    assert result.returncode == 2 and result.stderr.strip() == line


def test_checkpoint_formats(interrupted, tmp_path):
    """Format 1 (a bare torch.save file, before checksums) still loads; another label is
    refused with one line naming it."""
    newest = interrupted / CHECKPOINT
    state = read_checkpoint(newest)
    del state["faults"]  # format 1 had no fault counters
    old = tmp_path / "format1.pt"
    torch.save(state, old)
    agent = MBPO.load(old, make_env(POINT_MASS_ID, seed=0))
    assert agent.num_timesteps == 200 and agent.faults == {
        "model_divergences": 0,
        "critic_divergences": 0,
    }
    future = tmp_path / "format3.pt"
    future.write_bytes(newest.read_bytes().replace(b"format 2", b"format 3", 1))
    with pytest.raises(CheckedFileError, match="format 3.*this version reads"):
        MBPO.load(future, make_env(POINT_MASS_ID, seed=0))


def test_nan_in_one_model_training_batch_is_survived(tmp_path, monkeypatch):
    """The second retraining (step 200) meets a NaN in one minibatch: it is undone, the run
    finishes, summary.json counts it, and the model in use stays the finite one from before."""
    import mbrl_bilevel.ensemble as ensemble

    bootstrap, fit = ensemble.bootstrap_batches, ensemble.EnsembleLearner.fit
    seen = []  # the model's state at the start of each retraining

    def poisoned_batches(*args, **kwargs):
        for index, batch in enumerate(bootstrap(*args, **kwargs)):
            if len(seen) == 2 and index == 3:
                batch.x[0, 0, 0] = float("nan")
            yield batch

    def spy_fit(learner, model, train, val):
        seen.append({key: value.clone() for key, value in model.state_dict().items()})
        return fit(learner, model, train, val)

    monkeypatch.setattr(ensemble, "bootstrap_batches", poisoned_batches)
    monkeypatch.setattr(ensemble.EnsembleLearner, "fit", spy_fit)
    main(train_args("mbpo", tmp_path, "run"))
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["env_steps"] == 300 and summary["faults"]["model_divergences"] == 1
    assert len(seen) == 3  # retrainings at steps 100, 200 (undone) and 300
    assert all(torch.equal(seen[2][key], seen[1][key]) for key in seen[1])
    final = read_checkpoint(tmp_path / "run" / CHECKPOINT)["model"]
    assert all(
        torch.isfinite(tensor).all() for tensor in final.values() if tensor.is_floating_point()
    )
    model_rows = (tmp_path / "run/model.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in model_rows[1:]] == ["100", "300"]
    (events,) = (tmp_path / "run").glob("events.out.tfevents.*")
    logged = EventAccumulator(str(events)).Reload().Scalars("faults/model_divergences")
    assert [(event.step, event.value) for event in logged] == [(200, 1.0)]


def test_critic_divergence_is_detected_and_the_run_goes_on():
    config = replace_fields(PRESETS["tiny"], {"model.random_steps": 50, "mbpo.train_every": 50})
    agent = MBPO(make_env(POINT_MASS_ID, seed=0), config=config, seed=0).learn(100)
    assert agent.faults["critic_divergences"] == 0  # a healthy critic is within the bound
    with torch.no_grad():
        for critic in agent.sac.critic.q_networks:
            critic[-1].bias.fill_(1e6)  # Q far beyond 10 max|r| / (1 - γ)
    agent.learn(150)
    assert agent.num_timesteps == 150 and agent.faults["critic_divergences"] >= 1


def test_failed_write_stops_with_one_line_and_tears_nothing(
    reference, tmp_path, capsys, monkeypatch
):
    """The disk fills up while the third checkpoint is written (steps 50, 100, then 150): one
    line, exit 2, the last good checkpoints intact, no temporary file left; the run resumes and
    ends as the uninterrupted one."""
    fsync, calls = os.fsync, []

    def full_disk(fd):
        calls.append(fd)
        if len(calls) == 4:  # config.json, checkpoints at 50 and 100, then this one
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    run = tmp_path / "mbpo"
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", full_disk)
        with pytest.raises(SystemExit) as exit_info:
            main(train_args("mbpo", tmp_path, "mbpo"))
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == f"mbrl-bilevel: error: cannot write {run / CHECKPOINT}: No space left on device"
    assert not list(run.rglob("*.tmp"))
    assert read_checkpoint(run / CHECKPOINT)["num_timesteps"] == 100
    assert read_checkpoint(previous_path(run / CHECKPOINT))["num_timesteps"] == 50
    main(resume_args(run))
    assert_same_run(run, reference["mbpo"])


def test_a_live_runs_folder_is_refused_and_a_dead_runs_lock_is_not(interrupted, tmp_path, capsys):
    run = Path(shutil.copytree(interrupted, tmp_path / "mbpo"))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom mbrl_bilevel.runs import run_lock\n"
            "with run_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)",
            str(run),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        sweep_job = train_args("mbpo", tmp_path, "mbpo")  # what a sweep starts on the folder
        for args in (resume_args(run), sweep_job):
            with pytest.raises(SystemExit) as exit_info:
                main(args)
            assert exit_info.value.code == 2
            (line,) = capsys.readouterr().err.splitlines()
            assert line == (
                f"mbrl-bilevel: error: {run} is in use by a live run (pid {holder.pid}): "
                "wait for it to end or stop it"
            )
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    assert (run / LOCK).read_text().strip() == str(holder.pid)  # the dead run's stale lock file
    with run_lock(run):
        assert (run / LOCK).read_text().strip() == str(os.getpid())
