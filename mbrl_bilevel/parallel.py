"""Run one function per seed, in parallel worker processes, with a progress bar."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from typing import Any

from tqdm.auto import tqdm

from mbrl_bilevel.allocator import keep_freed_memory


def map_seeds(
    function: Callable[..., Any], seeds: int, jobs: int, desc: str = "seeds", **kwargs
) -> list[Any]:
    """[function(seed, **kwargs) for seed in range(seeds)], run in up to `jobs` processes.

    Results come back in seed order. Workers are spawned (not forked), so `function` must be
    importable and its arguments picklable; each worker sets its own torch thread count, and
    keeps its freed memory (allocator.py).
    """
    task = partial(function, **kwargs)
    if jobs <= 1 or seeds <= 1:
        return [task(seed) for seed in tqdm(range(seeds), desc=desc, disable=None)]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        min(jobs, seeds), mp_context=context, initializer=keep_freed_memory
    ) as pool:
        return list(tqdm(pool.map(task, range(seeds)), total=seeds, desc=desc, disable=None))
