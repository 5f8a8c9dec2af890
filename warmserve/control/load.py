"""Per-model load: the number of in-flight requests, as a step function of time."""

from __future__ import annotations

import math
from collections import deque


class ConcurrencySeries:
    """Integrates concurrency for forecast windows and keeps recent steps for the autoscaler.

    Load is counted from a request's arrival to its completion, queueing included, as the
    reference does.
    """

    __slots__ = (
        "_horizon_s",
        "_steps",
        "last_step",
        "last_t",
        "num_reqs",
        "window_integral",
        "window_peak",
    )

    def __init__(self, horizon_s: float, start_s: float = 0.0) -> None:
        self._horizon_s = horizon_s
        self.num_reqs = 0
        self.last_t = start_s
        self.window_integral = 0.0  # ∫ load dt since the window opened
        self.window_peak = 0
        # (time, count from then on); the oldest step at or before now - horizon is kept.
        self._steps: deque[tuple[float, int]] = deque([(start_s, 0)])
        # (time, count) of the last change, the newest step: a new tuple on every `add`.
        self.last_step = self._steps[-1]

    def __len__(self) -> int:
        """Steps kept: those of the last horizon, and the one before."""
        return len(self._steps)

    def add(self, now: float, delta: int) -> None:
        self.window_integral += (now - self.last_t) * self.num_reqs
        self.last_t = now
        self.num_reqs += delta
        assert self.num_reqs >= 0, "more completions than arrivals"
        if self.num_reqs > self.window_peak:
            self.window_peak = self.num_reqs
        steps = self._steps
        step = self.last_step = (now, self.num_reqs)
        if steps[-1][0] == now:
            steps[-1] = step
        else:
            steps.append(step)
        cutoff = now - self._horizon_s
        while len(steps) > 1 and steps[1][0] <= cutoff:
            steps.popleft()

    def before_last(self) -> tuple[float, int] | None:
        """The step before the last one, if any (as `last_step` was then)."""
        steps = self._steps
        return steps[-2] if len(steps) > 1 else None

    def idle_since(self, start: float) -> bool:
        """No request in flight, and none since `start`: `mean` over a span from `start` is 0."""
        return self.num_reqs == 0 and self._steps[-1][0] <= start

    def mean(self, now: float, span_s: float) -> float:
        """Time-weighted mean concurrency over [now - span_s, now]."""
        start = now - span_s
        steps = self._steps
        if steps[-1][0] <= start:
            return float(self.num_reqs)  # no change inside the span
        # Each step's share, clipped to the span, summed in step order (called every tick
        # for every model: comparisons instead of min/max calls).
        total = 0.0
        it = iter(steps)
        t, n = next(it)
        for t_next, n_next in it:
            lo = t if t > start else start
            hi = t_next if t_next < now else now
            if hi > lo:
                total += (hi - lo) * n
            t, n = t_next, n_next
        lo = t if t > start else start
        if now > lo:
            total += (now - lo) * n
        return total / span_s

    def window_counts(self, start: float) -> tuple[int, int, float]:
        """What every later `mean` over a span that begins at or after `start` weighs, until
        the next `add`: (lowest, highest) count held at any time after `start` (lowest 0 if the
        series begins after it: `mean` counts that stretch as 0), and when the last positive
        count ended (inf: it still holds; -inf: none after `start`)."""
        steps = self._steps
        lo = hi = self.num_reqs  # the last step's count, held from then on
        end = math.inf  # when the step visited ended
        busy_until = -math.inf
        for t, n in reversed(steps):
            if n < lo:
                lo = n
            elif n > hi:
                hi = n
            if n > 0 and busy_until == -math.inf:
                busy_until = end
            if t <= start:
                break  # this step held its count across `start`; the earlier ones ended before
            end = t
        else:
            lo = 0
        return lo, hi, busy_until

    def close_window(self, now: float, window_s: float) -> tuple[float, int]:
        """(time-weighted mean, peak) of the window ending now; opens the next one."""
        integral = self.window_integral + (now - self.last_t) * self.num_reqs
        peak = self.window_peak
        self.window_integral = 0.0
        self.last_t = now
        self.window_peak = self.num_reqs
        return integral / window_s, peak
