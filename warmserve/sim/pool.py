"""Independent simulation cells (policy x seed x setting) in worker processes.

A cell is one `run_policy` call or anything else that shares no state with the others, so an
evaluation's cells can run side by side on several cores. Results come back in the order of
the cells whatever order they finish in, and a cell computes the same thing in a worker as in
the calling process (the simulator is deterministic for a given seed), so the number of
workers changes only the wall time.

    from warmserve.sim.pool import run_cells
    summaries = run_cells(simulate_cell, cells, workers=2, progress=print)

`fn` must be picklable (a module-level function) and so must each cell and result. Workers
are started with `spawn`: they inherit no threads or locks from the caller (e.g. a progress
bar's), at the cost of importing the simulator once each.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from typing import TypeVar

C = TypeVar("C")
R = TypeVar("R")


class CellError(RuntimeError):
    """A cell raised: says which one; the worker's exception is the cause."""


def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def run_cells(
    fn: Callable[[C], R],
    cells: Sequence[C],
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[R]:
    """`[fn(c) for c in cells]`, on up to `workers` processes (default: the usable cores).

    One worker (or one cell) runs in this process, with no pool. `progress(done, total)` is
    called after each cell. The first cell to fail stops the rest: cells not started are
    cancelled and a `CellError` naming the cell is raised.
    """
    if workers is None:
        workers = default_workers()
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    total = len(cells)
    if workers == 1 or total <= 1:
        out = []
        for k, cell in enumerate(cells):
            try:
                out.append(fn(cell))
            except Exception as e:
                raise CellError(f"cell {k} ({cell!r}) failed: {e}") from e
            if progress is not None:
                progress(k + 1, total)
        return out
    results: list[R | None] = [None] * total
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, total), mp_context=ctx) as pool:
        futures = {pool.submit(fn, cell): k for k, cell in enumerate(cells)}
        pending = set(futures)
        done_count = 0
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for f in done:
                k = futures[f]
                err = f.exception()
                if err is not None:
                    for p in pending:
                        p.cancel()
                    raise CellError(f"cell {k} ({cells[k]!r}) failed: {err}") from err
                results[k] = f.result()
                done_count += 1
                if progress is not None:
                    progress(done_count, total)
    return results  # type: ignore[return-value]  # every slot was filled
