"""The other jobs' share of a shared host, from the workers' run-queue statistics
(calibration/host_load.py): the estimate inverts the simulator's processor-sharing model."""

import math
import os
import time

import pytest

from warmserve.calibration.host_load import background_threads, sched_seconds
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
