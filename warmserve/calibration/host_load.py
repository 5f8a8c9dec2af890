"""How much of a shared host the serve workers got: the kernel's scheduler statistics.

On a host other jobs share, a worker's step takes longer than its CPU time by the time it sat
runnable in the run queue. `benchmarks/fidelity.py` reads that for the workers of a real run
and turns it into the other jobs' share of the cores (`host.background_threads` in a device
profile), so the simulator can be compared with a run that did not have the host to itself.
`background_series` does the same per interval of a run sampled as it goes (`SchedSampler`):
the other jobs as a time series (`host.background_schedule`), since they come in bursts.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
from dataclasses import dataclass


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
    b_cpu, stretch_cpu, total_cpu = _cpu_weighted(workers, main_cpu_s, wall_s, cores)
    if total_cpu <= 0 or wall_s <= 0:
        return float("nan"), float("nan")
    return b_cpu / total_cpu, stretch_cpu / total_cpu


def _cpu_weighted(workers: list[tuple[float, float]], main_cpu_s: float, wall_s: float,
                  cores: float) -> tuple[float, float, float]:  # fmt: skip
    """`background_threads`' two figures times the workers' CPU seconds, and those seconds:
    sums over intervals of these give the CPU-weighted mean of the intervals' figures."""
    total_cpu = sum(c for c, _ in workers)
    if total_cpu <= 0 or wall_s <= 0:
        return 0.0, 0.0, 0.0
    runnable = [c + w for c, w in workers]
    b = stretch = 0.0
    for i, (c, w) in enumerate(workers):
        if c <= 0:
            continue
        s_i = (c + w) / c
        d_i = 1.0 + (sum(runnable) - runnable[i] + main_cpu_s) / wall_s
        b += c * max(0.0, cores * s_i - d_i)
        stretch += c * s_i
    return b, stretch, total_cpu


@dataclass(frozen=True, slots=True)
class SchedSample:
    """The counters at one moment of a run, each cumulative since its process started."""

    t_s: float  # when (any clock, the same for every sample of a run)
    workers: tuple[tuple[float, float], ...]  # each worker's (CPU, run-queue wait) seconds
    main_cpu_s: float  # the serve process's own CPU seconds


@dataclass(frozen=True, slots=True)
class BackgroundSeries:
    """The other jobs through a run, one figure per interval between consecutive samples."""

    starts_s: tuple[float, ...]  # each interval's start (the samples' clock)
    threads: tuple[float, ...]  # its `background_threads`, NaN where the workers did not run
    worker_cpu_s: tuple[float, ...]  # the workers' CPU seconds in it: the figure's weight
    # The run's figures: each interval's weighted by its workers' CPU seconds (the same
    # weighting `background_threads` applies to the workers of one interval); NaN if none ran.
    mean_threads: float
    mean_stretch: float

    def schedule(self, origin_s: float, min_cpu_s: float = 0.1) -> tuple[tuple[float, float], ...]:
        """The series as `HostParams.background_schedule`: (seconds since `origin_s`, threads)
        from each interval's start. An interval where the workers ran less than `min_cpu_s`
        (too little to time their wait; they hardly meet the other jobs there either) takes
        the run's mean."""
        fill = 0.0 if math.isnan(self.mean_threads) else self.mean_threads
        return tuple(
            (t - origin_s, b if cpu >= min_cpu_s and not math.isnan(b) else fill)
            for t, b, cpu in zip(self.starts_s, self.threads, self.worker_cpu_s, strict=True)
        )


def background_series(samples: list[SchedSample], cores: float) -> BackgroundSeries:
    """`background_threads` of each interval between consecutive samples, and of the run.

    A worker whose counters went backwards in an interval (it restarted) sits that interval
    out: its new process counts from zero."""
    starts, threads, weights = [], [], []
    b_sum = stretch_sum = cpu_sum = 0.0
    for a, z in itertools.pairwise(samples):
        used = [(c1 - c0, w1 - w0) for (c0, w0), (c1, w1) in zip(a.workers, z.workers, strict=True)
                if c1 >= c0 and w1 >= w0]  # fmt: skip
        b, stretch, cpu = _cpu_weighted(used, z.main_cpu_s - a.main_cpu_s, z.t_s - a.t_s, cores)
        starts.append(a.t_s)
        threads.append(b / cpu if cpu > 0 else float("nan"))
        weights.append(cpu)
        b_sum, stretch_sum, cpu_sum = b_sum + b, stretch_sum + stretch, cpu_sum + cpu
    nan = float("nan")
    return BackgroundSeries(tuple(starts), tuple(threads), tuple(weights),
                            b_sum / cpu_sum if cpu_sum > 0 else nan,
                            stretch_sum / cpu_sum if cpu_sum > 0 else nan)  # fmt: skip


class SchedSampler(threading.Thread):
    """The workers' schedstat and this process's CPU every `every_s` seconds, as the run goes.
    A read costs well under a millisecond (a few /proc files per worker thread)."""

    def __init__(self, pids: list[int], every_s: float) -> None:
        super().__init__(daemon=True)
        self.pids, self.every_s = pids, every_s
        self.samples: list[SchedSample] = []
        self._halt = threading.Event()
        self.sample()  # the first, now: the replay's start

    def sample(self) -> None:
        self.samples.append(SchedSample(time.perf_counter(),
                                        tuple(sched_seconds(p) for p in self.pids),
                                        time.process_time()))  # fmt: skip

    def run(self) -> None:
        while not self._halt.wait(self.every_s):
            self.sample()

    def finish(self) -> list[SchedSample]:
        self._halt.set()
        self.join()
        self.sample()
        return self.samples
