"""How much of a shared host the serve workers got: the kernel's scheduler statistics.

On a host other jobs share, a worker's step takes longer than its CPU time by the time it sat
runnable in the run queue. `benchmarks/fidelity.py` reads that for the workers of a real run
and turns it into the other jobs' share of the cores (`host.background_threads` in a device
profile), so the simulator can be compared with a run that did not have the host to itself.
"""

from __future__ import annotations

import os


def sched_seconds(pid: int) -> tuple[float, float]:
    """(CPU seconds, seconds runnable but waiting for a CPU) of every thread of a process
    so far, from the kernel's scheduler statistics; (0, 0) where they cannot be read."""
    cpu = wait = 0.0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0, 0.0
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                on, delay, _ = f.read().split()
        except (OSError, ValueError):
            continue  # the thread ended meanwhile
        cpu += int(on) / 1e9
        wait += int(delay) / 1e9
    return cpu, wait


def background_threads(workers: list[tuple[float, float]], main_cpu_s: float, wall_s: float,
                       cores: float) -> tuple[float, float]:  # fmt: skip
    """The other jobs' share of the host during a run, in serve-worker threads, and the
    workers' mean stretch. `workers`: each worker's (CPU, run-queue wait) seconds over the
    run; `main_cpu_s`: the serve process's own CPU (gateway, control plane, client).

    In the processor-sharing model (sim/host.py) a worker that steps while d serve threads
    want a core in all (itself included) and b other threads do runs (d + b) / cores times
    slower than alone. A worker's stretch s = (CPU + wait) / CPU is that factor averaged over
    its steps, and d is 1 + the other workers' runnable share of the run + the serve process's
    CPU share, so b = cores * s - d, weighted over the workers by their CPU seconds."""
    total_cpu = sum(c for c, _ in workers)
    if total_cpu <= 0 or wall_s <= 0:
        return float("nan"), float("nan")
    runnable = [c + w for c, w in workers]
    b = stretch = 0.0
    for i, (c, w) in enumerate(workers):
        if c <= 0:
            continue
        s_i = (c + w) / c
        d_i = 1.0 + (sum(runnable) - runnable[i] + main_cpu_s) / wall_s
        b += c / total_cpu * max(0.0, cores * s_i - d_i)
        stretch += c / total_cpu * s_i
    return b, stretch
