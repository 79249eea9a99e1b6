"""Run tasks (one `python -m <cli> <command> ...` process each) on a local pool or on Ray."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from mbrl_bilevel.validation import ConfigError


@dataclass(frozen=True)
class Task:
    """One run: `python -m <module> <args...>`, its output appended to the file `log`."""

    run: str
    module: str
    args: list[str]
    log: str


@dataclass(frozen=True)
class Outcome:
    """How a task ended: exit status, wall seconds, and the last line it printed on failure."""

    run: str
    returncode: int
    seconds: float
    error: str | None


def execute(task: Task, live: set | None = None, lock: threading.Lock | None = None) -> Outcome:
    """Run `task` to its end with this interpreter; `live` (with `lock`) holds it while it runs,
    so that an interrupted sweep can stop it."""
    argv = [sys.executable, "-m", task.module, *task.args]
    start = time.perf_counter()
    with open(task.log, "a") as log:
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        try:
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        except OSError as error:
            return Outcome(task.run, -1, 0.0, f"cannot start {argv[0]}: {error}")
        if live is not None:
            with lock:
                live.add(process)
        try:
            returncode = process.wait()
        finally:
            if live is not None:
                with lock:
                    live.discard(process)
    seconds = time.perf_counter() - start
    return Outcome(task.run, returncode, seconds, None if returncode == 0 else last_line(task.log))


def last_line(path: str) -> str:
    """The last non-empty line of a log (progress bars split on carriage returns)."""
    with open(path, errors="replace") as log:
        lines = [line.strip() for line in log.read().replace("\r", "\n").splitlines()]
    return next((line for line in reversed(lines) if line), "(no output)")


def run_local(tasks: list[Task], jobs: int, on_done: Callable[[Outcome], None]) -> None:
    """Run `tasks` in up to `jobs` processes at once; stop them all if interrupted."""
    live: set[subprocess.Popen] = set()
    lock = threading.Lock()
    pool = ThreadPoolExecutor(max(1, jobs))
    futures = [pool.submit(execute, task, live, lock) for task in tasks]
    try:
        for future in as_completed(futures):
            on_done(future.result())
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        with lock:
            for process in live:
                process.terminate()
            for process in live:
                process.wait()
        raise
    pool.shutdown()


def run_ray(
    tasks: list[Task], jobs: int, address: str | None, on_done: Callable[[Outcome], None]
) -> None:
    """Run `tasks` as Ray tasks of one CPU each: on the cluster at `address`, or on a local Ray
    instance of `jobs` CPUs. Run folders must be on storage that every node shares."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--backend ray needs Ray: pip install 'mbrl-bilevel[ray]'") from None
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=jobs, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(num_cpus=1, max_retries=0)(execute)
    pending = {remote.remote(task): task for task in tasks}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                pending.pop(ref)
                on_done(ray.get(ref))
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        ray.shutdown()


def run_tasks(
    tasks: Iterable[Task],
    backend: str,
    jobs: int,
    address: str | None,
    on_done: Callable[[Outcome], None],
) -> None:
    """Run `tasks` on the `backend` ("local" or "ray"), calling `on_done` as each ends."""
    tasks = list(tasks)
    with sigterm_unwinds():
        if backend == "ray":
            run_ray(tasks, jobs, address, on_done)
        else:
            run_local(tasks, jobs, on_done)


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Inside, SIGTERM (kill, a job scheduler) raises SystemExit like Ctrl-C raises
    KeyboardInterrupt, so the runs are stopped with the sweep instead of left running."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_now(signum, frame):
        sys.exit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_now)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
