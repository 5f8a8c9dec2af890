"""One simulated serving instance: iteration-level continuous batching over its KV pages.

Scheduling follows vLLM's default (non-chunked) policy: admit waiting requests FCFS while
their whole KV (prompt + max tokens) fits, run admitted prompts as one prefill step, otherwise
run a decode step for every running request. Consecutive decode steps with an unchanged batch
are simulated as one *run* (a vector of step times) that ends at the first completion, or
earlier, at the next step boundary, when a new request can be admitted.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from warmserve.hardware import PAGE_BYTES
from warmserve.sim.host import SharedHost
from warmserve.sim.latency import StepTimeModel
from warmserve.sim.loop import EventLoop
from warmserve.types import InstanceState


@dataclass(slots=True)
class SimRequest:
    request_id: int
    input_tokens: int
    output_tokens: int
    generated: int = 0

    @property
    def kv_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


class SharedDevice:
    """GPUs that co-located instances share by time (MuxServe-style multiplexing).

    While k of them have work, each step takes k times its solo time (processor sharing). When
    the number of busy instances changes, the others end their decode run at the next step
    boundary and go on at the new speed.
    """

    __slots__ = ("busy",)

    def __init__(self) -> None:
        self.busy: set[SimInstance] = set()

    @property
    def slowdown(self) -> int:
        return max(1, len(self.busy))

    def set_busy(self, inst: SimInstance, busy: bool) -> None:
        before = len(self.busy)
        (self.busy.add if busy else self.busy.discard)(inst)
        if len(self.busy) != before:
            for other in sorted(self.busy, key=lambda i: i.instance_id):
                if other is not inst and other._run is not None:
                    other._cut_run()


class SimInstance:
    def __init__(
        self,
        instance_id: int,
        model: str,
        gpus: tuple[int, ...],
        step_model: StepTimeModel,
        kv_bytes_per_token_per_gpu: float,
        loop: EventLoop,
        on_first_token: Callable[[int, float], None],
        on_finish: Callable[[SimInstance, SimRequest, float], None],
        on_kv_change: Callable[[SimInstance], None],
        device: SharedDevice | None = None,
        on_kv_pressure: Callable[[SimInstance], None] | None = None,
        host: SharedHost | None = None,
    ) -> None:
        self.instance_id = instance_id
        self.model = model
        self.gpus = gpus
        self.state = InstanceState.STARTING
        self._kv_pages = 0
        self._capacity_tokens = 0  # kv_capacity_tokens, worked out when kv_pages is set
        self.kv_lent_pages = 0
        self._steps = step_model
        self._kv_tok = kv_bytes_per_token_per_gpu
        self._loop = loop
        self._on_first_token = on_first_token
        self._on_finish = on_finish
        self._on_kv_change = on_kv_change
        self._device = device
        self._host = host  # None: the device does not share a host's cores
        self.token_rate = 0.0  # tokens/s of the current step or run, solo (the gateway's load)
        self._on_kv_pressure = on_kv_pressure
        self._pressure_reported = False
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.used_tokens = 0
        self._busy = False
        self._run: tuple[float, np.ndarray, int] | None = None  # (start, cum times, token)
        self._token = 0
        # For re-rating on the host's background changes: the slowdown the step or run in
        # flight goes at, and a prefill in flight as (end time, its requests).
        self._slow = 1.0
        self._prefill: tuple[float, list[SimRequest]] | None = None

    # ----- KV accounting ----------------------------------------------------------------
    @property
    def kv_pages(self) -> int:
        return self._kv_pages

    @kv_pages.setter
    def kv_pages(self, pages: int) -> None:
        self._kv_pages = pages
        self._capacity_tokens = int(pages * PAGE_BYTES // self._kv_tok)

    @property
    def kv_capacity_tokens(self) -> int:
        return self._capacity_tokens

    @property
    def kv_used_pages(self) -> int:
        return math.ceil(self.used_tokens * self._kv_tok / PAGE_BYTES)

    @property
    def num_requests(self) -> int:
        return len(self.waiting) + len(self.running)

    def _fits(self, req: SimRequest) -> bool:
        return self.used_tokens + req.kv_tokens <= self._capacity_tokens

    # ----- control ----------------------------------------------------------------------
    def add(self, req: SimRequest) -> None:
        self.waiting.append(req)
        if self.state == InstanceState.STARTING:
            return
        if not self._busy:
            self._step()
        elif len(self.waiting) == 1:
            if self._fits(req):
                if self._run is not None:
                    self._cut_run()
            else:
                self._report_pressure()

    def mark_ready(self) -> None:
        self.state = InstanceState.RUNNING
        self._step()

    def kv_changed(self) -> None:
        """KV capacity grew: admit what now fits (mid-run: at the next step boundary)."""
        self._pressure_reported = False
        if self.state == InstanceState.STARTING:
            return
        if not self._busy:
            self._step()
        elif self._run is not None and self.waiting and self._fits(self.waiting[0]):
            self._cut_run()

    def _report_pressure(self) -> None:
        """Requests wait for KV while pages are lent: ask for them back (once per stall)."""
        if self.kv_lent_pages > 0 and self._on_kv_pressure and not self._pressure_reported:
            self._pressure_reported = True
            self._loop.at(self._loop.now(), self._on_kv_pressure, self)

    # ----- stepping ---------------------------------------------------------------------
    def _step(self) -> None:
        now = self._loop.now()
        admitted: list[SimRequest] = []
        waiting = self.waiting
        n = sq = 0
        if waiting:
            # FCFS while the whole KV fits. The prompt tokens and their squares are summed on
            # the way, as integers.
            while waiting and self._fits(waiting[0]):
                req = waiting.popleft()
                self.used_tokens += req.kv_tokens
                admitted.append(req)
                n += req.input_tokens
                sq += req.input_tokens * req.input_tokens
            if waiting:
                self._report_pressure()
        if admitted:
            self._on_kv_change(self)
            t = self._steps.prefill(n, float(sq), len(admitted))
            if self._host is not None:
                self.token_rate = len(admitted) / t
            self._set_busy(True)
            slow = self._device.slowdown if self._device else 1
            if self._host is not None:
                slow *= self._host.slowdown()
            self._slow = slow
            self._token += 1
            self._prefill = (now + slow * t, admitted)
            self._loop.at(now + slow * t, self._prefill_done, admitted, self._token)
            return
        if not self.running:
            self._set_busy(False)
            return
        running = self.running
        batch = len(running)
        # The run's length (the fewest tokens any request has left) and its context, in one
        # pass: the same integers as min() and sum() over the batch.
        steps = running[0].output_tokens - running[0].generated
        tokens = 0
        for r in running:
            g = r.generated
            if r.output_tokens - g < steps:
                steps = r.output_tokens - g
            tokens += r.input_tokens + g
        cum = self._steps.decode_run(batch, float(tokens), steps)
        if self._host is not None:
            self.token_rate = batch * steps / float(cum[-1])
        self._set_busy(True)
        if self._device is not None:
            cum = cum * self._device.slowdown
        if self._host is not None:
            slow = self._host.slowdown()
            self._slow = slow * (self._device.slowdown if self._device else 1)
            cum = cum * slow
        self._token += 1
        self._run = (now, cum, self._token)
        self._loop.at(now + float(cum[-1]), self._decode_done, steps, self._token)

    def _set_busy(self, busy: bool) -> None:
        self._busy = busy
        if self._device is not None:
            self._device.set_busy(self, busy)
        if self._host is not None:
            self._host.set_stepping(self, busy)

    def _cut_run(self) -> None:
        """End the current decode run at the next step boundary, to admit a new request."""
        assert self._run is not None
        start, cum, _ = self._run
        elapsed = self._loop.now() - start
        k = int(cum.searchsorted(elapsed, side="left"))  # boundary at or after now
        if k >= len(cum) - 1:
            return  # the run ends at its last step anyway
        self._token += 1
        self._run = (start, cum, self._token)
        self._loop.at(start + float(cum[k]), self._decode_done, k + 1, self._token)

    def _rerate(self) -> None:
        """The host's other jobs changed: the step in flight goes on at the new speed (its
        remaining solo work at the new slowdown), and a decode run ends with that step."""
        assert self._host is not None
        now = self._loop.now()
        slow = self._host.slowdown() * (self._device.slowdown if self._device else 1)
        if slow == self._slow:
            return
        if self._prefill is not None:
            end, admitted = self._prefill
            end = now + (end - now) * slow / self._slow
            self._token += 1
            self._prefill = (end, admitted)
            self._loop.at(end, self._prefill_done, admitted, self._token)
        elif self._run is not None:
            start, cum, _ = self._run
            k = int(np.searchsorted(cum, now - start, side="left"))  # the step in flight
            # Scheduled at `end`, not start + cum[k]: that sum may round a hair below now.
            end = now + max(0.0, start + float(cum[k]) - now) * slow / self._slow
            cum = cum[: k + 1].copy()
            cum[k] = end - start
            self._token += 1
            self._run = (start, cum, self._token)
            self._loop.at(end, self._decode_done, k + 1, self._token)
        else:
            return
        self._slow = slow

    def _prefill_done(self, admitted: list[SimRequest], token: int) -> None:
        if token != self._token:
            return  # re-rated: it ends later or earlier
        self._prefill = None
        now = self._loop.now()
        for req in admitted:
            req.generated = 1
            self._on_first_token(req.request_id, now)
            self.running.append(req)
        self._retire(now)
        self._step()

    def _decode_done(self, steps: int, token: int) -> None:
        if token != self._token:
            return  # superseded by a cut
        self._run = None
        for req in self.running:
            req.generated += steps
        self._retire(self._loop.now())
        self._step()

    def _retire(self, now: float) -> None:
        done = [r for r in self.running if r.generated >= r.output_tokens]
        if not done:
            return
        self.running = [r for r in self.running if r.generated < r.output_tokens]
        for req in done:
            self.used_tokens -= req.kv_tokens
            self._on_kv_change(self)  # before the finish: its handler may read the books
            self._on_finish(self, req, now)
