"""Running sweeps: finished runs are skipped, interrupted resumable runs resumed, failed runs
recorded with their error and retried. A stand-in command (a script of a few lines) keeps these
fast; tests/test_sweep_acceptance.py runs the real `train`."""

import importlib
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mbrl_bilevel.sweep.command import SweepConfig, run_sweep
from mbrl_bilevel.validation import ConfigError

FAKE = '''
"""A stand-in command: writes config.json, then fails, stops or finishes (summary.json)."""
import json, os, sys, time
from dataclasses import asdict, dataclass
from pathlib import Path
import tyro

@dataclass(frozen=True)
class FakeConfig:
    x: int = 0
    seed: int = 0
    name: str | None = None
    out_dir: str = "runs"
    resume: str | None = None
    progress: bool = True

def main():
    config = tyro.cli(FakeConfig, args=sys.argv[2:])
    run = Path(config.resume or Path(config.out_dir) / config.name)
    if config.resume:
        config = FakeConfig(**json.loads((run / "config.json").read_text()))
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(asdict(config)))
    with open(run.parent / "calls.txt", "a") as calls:
        calls.write(f"{config.name} {'resume' if sys.argv.count('--resume') else 'start'}\\n")
    if (run.parent / f"fail-{config.name}").exists():
        print("mbrl-bilevel: error: boom", file=sys.stderr)
        sys.exit(2)
    if (run.parent / f"hang-{config.name}").exists():
        (run / "pid").write_text(str(os.getpid()))
        time.sleep(300)
    if (run.parent / f"stop-{config.name}").exists():
        sys.exit(0)  # as if killed after its first checkpoint: no summary.json
    (run / "summary.json").write_text(json.dumps({"x": config.x}))

if __name__ == "__main__":
    main()
'''


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """The module name and config class of the stand-in command, importable by children."""
    (tmp_path / "fake_cli.py").write_text(textwrap.dedent(FAKE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    sys.modules.pop("fake_cli", None)
    return importlib.import_module("fake_cli")


def sweep(tmp_path, fake, fixed="", **options):
    spec = tmp_path / "s.toml"
    spec.write_text(
        f'command = "fake"\nout_dir = "{tmp_path / "runs"}"\n{fixed}\n[grid]\nx = [1, 2, 3]\n'
    )
    config = SweepConfig(str(spec), **options)
    outcomes, folder = run_sweep(config, {"fake": fake.FakeConfig}, lambda c: None, "fake_cli")
    return outcomes, folder


def calls(folder):
    return sorted((folder / "calls.txt").read_text().splitlines())


def test_finished_runs_are_skipped_and_interrupted_ones_resumed(tmp_path, fake, capsys):
    folder = tmp_path / "runs" / "s"
    folder.mkdir(parents=True)
    (folder / "stop-x=2").touch()
    outcomes, _ = sweep(tmp_path, fake)
    assert [o.returncode for o in outcomes] == [0, 0, 0]
    assert calls(folder) == ["x=1 start", "x=2 start", "x=3 start"]
    assert not (folder / "x=2" / "summary.json").exists()

    (folder / "stop-x=2").unlink()
    (folder / "calls.txt").unlink()
    outcomes, _ = sweep(tmp_path, fake)
    assert calls(folder) == ["x=2 resume"]  # only the interrupted run, resumed
    assert json.loads((folder / "x=2" / "summary.json").read_text()) == {"x": 2}
    assert "1 runs done now, 2 finished before, 0 failed" in capsys.readouterr().out

    (folder / "calls.txt").unlink()
    assert sweep(tmp_path, fake)[0] == [] and not (folder / "calls.txt").exists()


def test_failed_run_is_reported_and_retried(tmp_path, fake, capsys):
    folder = tmp_path / "runs" / "s"
    folder.mkdir(parents=True)
    (folder / "fail-x=3").touch()
    outcomes, _ = sweep(tmp_path, fake, jobs=1)
    failed = [o for o in outcomes if o.returncode]
    assert [(o.run, o.returncode, o.error) for o in failed] == [
        ("x=3", 2, "mbrl-bilevel: error: boom")
    ]
    status = json.loads((folder / "status.json").read_text())["runs"]
    assert status["x=3"]["state"] == "failed" and status["x=3"]["error"].endswith("boom")
    assert status["x=1"]["state"] == "done"
    out = capsys.readouterr().out
    assert "FAILED x=3 (exit 2): mbrl-bilevel: error: boom" in out and "to retry" in out
    assert "boom" in (folder / "logs" / "x=3.log").read_text()

    (folder / "fail-x=3").unlink()
    (folder / "calls.txt").unlink()
    outcomes, _ = sweep(tmp_path, fake)
    assert [(o.run, o.returncode) for o in outcomes] == [("x=3", 0)]
    assert calls(folder) == ["x=3 resume"]  # it had written config.json before failing


def test_dry_run_runs_nothing(tmp_path, fake, capsys):
    assert sweep(tmp_path, fake, dry_run=True)[0] == []
    assert not (tmp_path / "runs").exists()
    assert "3 to start" in capsys.readouterr().out


def test_changed_options_of_an_existing_run_are_refused(tmp_path, fake):
    sweep(tmp_path, fake)
    config = tmp_path / "runs" / "s" / "x=1" / "config.json"
    config.write_text(config.read_text().replace('"seed": 0', '"seed": 5'))
    with pytest.raises(ConfigError, match="seed = 5 but the spec now says 0"):
        sweep(tmp_path, fake, "[options]\nseed = 0")


def test_terminated_sweep_stops_its_runs(tmp_path, fake):
    """SIGTERM to the sweep alone (not its process group) ends the runs it started."""
    folder = tmp_path / "runs" / "s"
    folder.mkdir(parents=True)
    (folder / "hang-x=1").touch()
    spec = tmp_path / "s.toml"
    spec.write_text(f'command = "fake"\nout_dir = "{tmp_path / "runs"}"\n[grid]\nx = [1]\n')
    driver = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fake_cli; from mbrl_bilevel.sweep.command import SweepConfig, run_sweep; "
            f"run_sweep(SweepConfig({str(spec)!r}), {{'fake': fake_cli.FakeConfig}}, "
            "lambda c: None, 'fake_cli')",
        ]
    )
    pid_file = folder / "x=1" / "pid"
    deadline = time.monotonic() + 60
    while not pid_file.is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    run_pid = int(pid_file.read_text())
    driver.send_signal(signal.SIGTERM)
    assert driver.wait(timeout=30) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 10
    while is_running(run_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not is_running(run_pid)
    status = json.loads((folder / "status.json").read_text())
    assert status["runs"]["x=1"]["state"] == "interrupted"


def is_running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (Linux /proc)."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
