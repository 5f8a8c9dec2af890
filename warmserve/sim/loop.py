"""Deterministic discrete-event loop: a heap of (time, sequence, callback, args)."""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

from warmserve.clock import SimClock


class EventLoop:
    """Same-time events run in the order they were scheduled, so a run is reproducible."""

    def __init__(self, start_s: float = 0.0) -> None:
        self.clock = SimClock(start_s)
        self._heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = 0
        self.num_events = 0

    def now(self) -> float:
        return self.clock._now  # read on most events: one call, not two

    def at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        assert t >= self.clock._now, "cannot schedule in the past"
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, fn, args))

    def run(
        self,
        until: float,
        after_event: Callable[[], None] | None = None,
        progress: Callable[[float], None] | None = None,
    ) -> None:
        heap = self._heap
        clock = self.clock
        pop = heapq.heappop
        if after_event is None and progress is None:  # the plain loop: the fewest steps
            # `at` refuses a time before now, so popped times never go backwards: the clock
            # is set directly, and the count kept in a local.
            n = 0
            try:
                while heap and heap[0][0] <= until:
                    t, _, fn, args = pop(heap)
                    clock._now = t
                    fn(*args)
                    n += 1
            finally:
                self.num_events += n
            return
        while heap and heap[0][0] <= until:
            t, _, fn, args = pop(heap)
            clock.advance_to(t)
            fn(*args)
            self.num_events += 1
            if after_event is not None:
                after_event()
            if progress is not None and self.num_events & 0x3FFF == 0:
                progress(t)

    def pending(self) -> int:
        return len(self._heap)
