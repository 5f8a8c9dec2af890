"""One host's CPU cores, shared by the simulated devices on it and by the gateway.

On a GPU node every device steps on its own silicon, so the simulator keeps them independent.
Where the "devices" are the host's own cores (a CPU serve worker is a process with a few torch
threads), they also compete with each other, with background weight loads (memcpy from the page
cache) and with the gateway, which tokenizes, detokenizes and writes SSE on the same cores.

The model is processor sharing: the host's `cores` go round the demand at any moment - each
worker that is stepping (its torch threads), each worker loading weights (one loader thread),
and the gateway's per-token work (a fluid share: seconds per streamed token × the tokens per
second the stepping workers emit), plus the host's other jobs (`background_threads`: zero on a
dedicated host). While the demand exceeds the cores, every step takes demand / cores times its
solo time. When the set of stepping or loading workers changes, the
others end their decode run at the next step boundary and go on at the new speed (as
`SharedDevice` does for co-located instances); a step's speed is otherwise fixed when it starts.

The other jobs are a constant by default (capacity planning: a dedicated host, or an assumed
share). To replay a measured run, `background_schedule` makes them piecewise constant in
simulated time: the interference a real run met comes in bursts, and an average over the run
gives most requests too much of it and the unlucky few too little. At each change of level
every stepping worker's step in flight is re-rated exactly: its remaining solo work (the time
left over the slowdown it was going at) goes on at the new slowdown, and a decode run ends at
that step (the next one starts at the new speed). A weight load keeps the speed it started
with (loads are rare and short beside a run's bursts).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from warmserve.sim.instance import SimInstance
    from warmserve.sim.loop import EventLoop


@dataclass(frozen=True, slots=True)
class HostParams:
    """A shared host's CPU, from the device profile's `host:` section."""

    cores: float = 1.0  # cores the workers and the gateway share
    threads_per_device: int = 1  # torch threads of one stepping worker
    # Host CPU seconds the gateway spends per streamed token (detokenize, SSE framing, HTTP
    # writes), charged as a fluid share of the cores.
    gateway_s_per_token: float = 0.0
    # Other jobs' runnable threads on the host, counted as serve workers' threads (in CPU
    # share, so a nice-0 job beside `nice` 10 workers counts several times). 0: a dedicated
    # host, the planning case. benchmarks/fidelity.py measures it during a real run from the
    # kernel's run-queue delay of the workers (/proc/PID/task/*/schedstat), to compare the
    # simulator with a run on a host that other jobs share.
    background_threads: float = 0.0
    # The other jobs as a time series: (from simulated second, threads) pairs, times strictly
    # increasing; before the first, `background_threads`. Not a profile key (a profile plans
    # for a host, a schedule replays one run): benchmarks/fidelity.py sets it from the
    # workers' schedstat sampled through a real run.
    background_schedule: tuple[tuple[float, float], ...] = field(
        default=(), metadata={"profile": False}
    )

    def __post_init__(self) -> None:
        if not self.cores > 0:
            raise ValueError("cores must be > 0")
        if self.threads_per_device < 1:
            raise ValueError("threads_per_device must be >= 1")
        if self.gateway_s_per_token < 0:
            raise ValueError("gateway_s_per_token must be >= 0")
        if not self.background_threads >= 0:
            raise ValueError("background_threads must be >= 0")
        times = [t for t, _ in self.background_schedule]
        if not all(math.isfinite(t) for t in times):
            raise ValueError("background_schedule times must be finite")
        if any(b <= a for a, b in itertools.pairwise(times)):
            raise ValueError("background_schedule times must be strictly increasing")
        if not all(0 <= b < math.inf for _, b in self.background_schedule):
            raise ValueError("background_schedule threads must be finite and >= 0")

    def background_at(self, t: float) -> float:
        """The other jobs' threads at simulated time `t`."""
        level = self.background_threads
        for start, threads in self.background_schedule:
            if start > t:
                break
            level = threads
        return level


class SharedHost:
    """The stepping and loading workers of one host, and the slowdown they cause each other."""

    __slots__ = ("_background", "_changes", "_gateway", "_loop", "_threads", "cores", "loading",
                 "stepping")  # fmt: skip

    def __init__(self, params: HostParams, loop: EventLoop | None = None) -> None:
        self.cores = params.cores
        self._threads = params.threads_per_device
        self._gateway = params.gateway_s_per_token
        # Insertion-ordered, so runs are cut in a reproducible order.
        self.stepping: dict[SimInstance, None] = {}
        self.loading: dict[int, None] = {}  # devices with a weight load in flight
        self._loop = loop
        self._background = params.background_threads
        self._changes: list[tuple[float, float]] = []  # (time, level), latest first
        if params.background_schedule:
            if loop is None:
                raise ValueError("a background_schedule needs the simulation's event loop")
            now = loop.now()
            self._background = params.background_at(now)
            level = self._background
            for t, b in params.background_schedule:
                if t > now and b != level:  # a change to the same level is no change
                    self._changes.append((t, b))
                    level = b
            self._changes.reverse()
            self._next_change()

    def _next_change(self) -> None:
        # One pending event at a time, so a long schedule does not crowd the event heap.
        if self._changes and self._loop is not None:
            t, level = self._changes.pop()
            self._loop.at(t, self._change, level)

    def _change(self, level: float) -> None:
        self._background = level
        for inst in list(self.stepping):
            inst._rerate()
        self._next_change()

    def slowdown(self) -> float:
        """How many times its solo time a step (or load) started now takes."""
        workers = len({inst.gpus for inst in self.stepping})  # co-located: one process
        tokens_per_s = sum(inst.token_rate for inst in self.stepping)
        demand = workers * self._threads + len(self.loading) + self._gateway * tokens_per_s
        return max(1.0, (demand + self._background) / self.cores)

    def set_stepping(self, inst: SimInstance, busy: bool) -> None:
        if _toggle(self.stepping, inst, busy):
            self._cut_runs(inst)

    def set_loading(self, device: int, busy: bool) -> None:
        if _toggle(self.loading, device, busy):
            self._cut_runs(None)

    def _cut_runs(self, changed: SimInstance | None) -> None:
        for other in list(self.stepping):
            if other is not changed and other._run is not None:
                other._cut_run()


def _toggle(members: dict, key: object, busy: bool) -> bool:
    """Put `key` in (busy) or out of the ordered set `members`; False if it already was."""
    if busy == (key in members):
        return False
    if busy:
        members[key] = None
    else:
        del members[key]
    return True
