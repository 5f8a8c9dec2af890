"""The other jobs' share of a shared host, from the workers' run-queue statistics
(calibration/host_load.py): the estimate inverts the simulator's processor-sharing model."""

import math
import os
import time

import pytest

from warmserve.calibration.host_load import (
    SchedSample,
    background_series,
    background_threads,
    sched_seconds,
)
from warmserve.sim.host import HostParams, SharedHost


def test_a_lone_worker_stretched_twice_on_two_cores_means_three_other_threads():
    b, stretch = background_threads([(10.0, 10.0), (0.0, 0.0)], 0.0, 100.0, 2.0)
    assert stretch == pytest.approx(2.0)
    assert b == pytest.approx(3.0)
    # ...which the simulator's host turns back into the same stretch.
    host = SharedHost(HostParams(cores=2.0, background_threads=b))

    class Busy:
        gpus, token_rate, _run = (0,), 0.0, None

    host.set_stepping(Busy(), True)  # type: ignore[arg-type]
    assert host.slowdown() == pytest.approx(stretch)


def test_the_serve_process_own_demand_is_not_counted_as_other_jobs():
    # Both workers runnable half the run and the gateway a tenth: a worker that waited as
    # long as it computed on 2 cores shares them with 1 + 0.5 + 0.1 of ours: 2.4 others.
    b, _ = background_threads([(25.0, 25.0), (25.0, 25.0)], 10.0, 100.0, 2.0)
    assert b == pytest.approx(2 * 2.0 - 1.6)
    # No waiting at all: no other jobs (never negative when ours alone exceed the cores).
    assert background_threads([(50.0, 0.0), (50.0, 0.0)], 0.0, 100.0, 1.0)[0] == 0.0
    assert math.isnan(background_threads([(0.0, 0.0)], 0.0, 100.0, 2.0)[0])  # nothing ran


def test_sched_seconds_reads_this_process():
    cpu0, wait0 = sched_seconds(os.getpid())
    t0 = time.thread_time()
    while time.thread_time() - t0 < 0.05:
        pass
    cpu1, wait1 = sched_seconds(os.getpid())
    assert cpu1 - cpu0 >= 0.04 and wait1 >= wait0 >= 0
    assert sched_seconds(2**22 + 12345) == (0.0, 0.0)  # no such process


def _cumulative(t0: float, steps: list[tuple[float, list[tuple[float, float]], float]]):
    """Samples from per-interval (seconds, each worker's (CPU, wait), serve CPU) increments."""
    t, main = t0, 5.0
    workers = [(1.0, 0.5)] * len(steps[0][1])  # counters start anywhere
    out = [SchedSample(t, tuple(workers), main)]
    for dt, used, m in steps:
        t, main = t + dt, main + m
        workers = [(c + dc, w + dw) for (c, w), (dc, dw) in zip(workers, used, strict=True)]
        out.append(SchedSample(t, tuple(workers), main))
    return out


def test_the_series_and_the_run_figure_are_one_formula():
    steps = [(1.0, [(0.5, 0.5), (0.2, 0.0)], 0.1),  # a burst of other jobs
             (1.0, [(0.4, 0.0), (0.4, 0.1)], 0.05),  # calm
             (0.5, [(0.0, 0.0), (0.0, 0.0)], 0.01),  # idle workers: nothing to time
             (1.0, [(0.9, 0.9), (0.9, 0.9)], 0.2)]  # fmt: skip
    series = background_series(_cumulative(100.0, steps), 2.0)
    assert series.starts_s == (100.0, 101.0, 102.0, 102.5)
    for got, (dt, used, m) in zip(series.threads, steps, strict=True):
        want = background_threads(used, m, dt, 2.0)[0]
        assert got == want or (math.isnan(got) and math.isnan(want))
    # The run's figure is the intervals' weighted by the workers' CPU in each.
    cpu = [sum(c for c, _ in used) for _, used, _ in steps]
    assert series.worker_cpu_s == pytest.approx(cpu)
    want = sum(b * c for b, c in zip(series.threads, cpu, strict=True) if c) / sum(cpu)
    assert series.mean_threads == pytest.approx(want, rel=1e-12)
    assert series.threads[0] > series.threads[1]  # the burst shows
    # One interval: the run figure is `background_threads` over the whole run.
    whole = background_series(_cumulative(0.0, steps[:1]), 2.0)
    assert (whole.mean_threads, whole.mean_stretch) == background_threads(
        *steps[0][1:2], 0.1, 1.0, 2.0
    )
    # A steady run: every interval and the run agree with the whole-run formula.
    steady = background_series(_cumulative(0.0, [steps[1]] * 4), 2.0)
    run = background_threads([(1.6, 0.0), (1.6, 0.4)], 0.2, 4.0, 2.0)[0]
    assert steady.threads == pytest.approx([run] * 4) and steady.mean_threads == pytest.approx(run)


def test_the_schedule_is_aligned_and_filled_where_the_workers_idled():
    steps = [(1.0, [(0.5, 0.5), (0.2, 0.0)], 0.1), (1.0, [(0.01, 0.0), (0.0, 0.0)], 0.0),
             (1.0, [(0.0, 0.0), (0.0, 0.0)], 0.0)]  # fmt: skip
    series = background_series(_cumulative(50.0, steps), 2.0)
    sched = series.schedule(origin_s=51.0)
    assert [t for t, _ in sched] == [-1.0, 0.0, 1.0]
    assert sched[0][1] == series.threads[0]
    assert sched[1][1] == sched[2][1] == series.mean_threads  # too little CPU, or none
    # A worker that restarted (counters back near zero) sits the interval out.
    a = SchedSample(0.0, ((10.0, 10.0), (5.0, 0.0)), 0.0)
    z = SchedSample(1.0, ((0.1, 0.0), (5.5, 0.5)), 0.0)
    assert background_series([a, z], 2.0).threads[0] == background_threads(
        [(0.5, 0.5)], 0.0, 1.0, 2.0)[0]  # fmt: skip
    assert math.isnan(background_series([a], 2.0).mean_threads)  # no interval at all
