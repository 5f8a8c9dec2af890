"""Reactive autoscaling on concurrency averaged over a short window (reference §7)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from warmserve.control.config import ControlConfig
from warmserve.control.load import ConcurrencySeries
from warmserve.types import InstanceId, ModelName


def scale_delta(load: float, num_active: int, cfg: ControlConfig) -> int:
    """Instances to add (> 0) or stop (< 0) for `load` averaged in-flight requests."""
    cap = num_active * cfg.capacity_per_instance
    if num_active > 0 and load < cfg.scale_down_threshold * cap:
        keep = math.ceil(load / cfg.scale_down_threshold / cfg.capacity_per_instance)
        return keep - num_active
    if load > cfg.scale_up_threshold * cap:
        want = math.ceil(load / cfg.scale_up_threshold / cfg.capacity_per_instance)
        return want - num_active
    return 0


# The relative slack on a windowed mean's bounds: far above its rounding error (see
# `QuietModels`), far below any gap between a count and a threshold that matters.
_MEAN_SLACK = 1e-6


class QuietModels:
    """Which models a tick's autoscaling would leave alone: with no request queued, the
    autoscaler acts only on a non-zero `scale_delta` of the windowed load, which is tested here
    as `Controller._autoscale` would test it, without the call.

    Until the model's load changes again (a new last step) or its live count does, the answer
    is often known without computing the mean. Every later window weighs only counts that the
    series holds after the current window's start (`ConcurrencySeries.window_counts`), and a
    mean of counts in [lo, hi] is in [lo, hi] give or take its rounding: the pieces' lengths
    are differences of nearby times (exact) summing to `now - start`, within one rounding of
    `now - span` of the span (1e-9 of it while |now| < 1e7 spans), and each product and sum
    adds a relative 2^-53 (1e-10 in all for a million steps). A window that still holds part
    of a positive count has a mean of at least that part (at least the float spacing at the
    count's end, over the span): positive. `scale_delta` does not decrease as the load grows
    (each branch is a monotone rounding, and the branches meet in order), so 0 at both ends
    of the bounds is 0 for every mean in between.
    """

    __slots__ = ("_cfg", "_load", "known", "limit_s")

    def __init__(self, load: dict[ModelName, ConcurrencySeries], cfg: ControlConfig) -> None:
        self._load = load
        self._cfg = cfg
        # Per model, (last step, live count, t, lo, hi): it scales by 0 while neither changes
        # and the window starts before t (`now - scale_window_s < t`), if `in_range(now)`;
        # lo and hi, the counts its bounds were proved for (-1: none). The tick reads the
        # first three before calling `scale_is_zero`.
        self.known: dict[ModelName, tuple] = {}
        # Beyond this clock reading (either way) the rounding of `now - span` could exceed the
        # bound above: `known` holds only while |now| < limit_s (`in_range`).
        self.limit_s = 1e7 * cfg.scale_window_s

    def in_range(self, now: float) -> bool:
        """Whether `known` holds at `now` (the clock within the bound's limit)."""
        return -self.limit_s < now < self.limit_s

    def scale_is_zero(self, name: ModelName, num_active: int, now: float) -> bool:
        series = self._load[name]
        last = series.last_step
        cfg = self._cfg
        span = cfg.scale_window_s
        start = now - span
        in_range = -self.limit_s < now < self.limit_s  # `in_range(now)`, without the call
        known = self.known.get(name)
        if (
            known is not None
            and known[0] is last
            and known[1] == num_active
            and start < known[2]
            and in_range
        ):
            return True
        if (
            known is not None
            and known[1] == num_active
            and known[3] >= 0
            and in_range
            and series.before_last() is known[0]
        ):
            # One change since a remembered answer whose bounds held: if the new count keeps
            # within them, so does every mean from now on (see `_extended`).
            entry = self._extended(known, last, start, now)
            if entry is not None and len(series) <= 1_000_000:
                self.known[name] = entry
                return True
        if last[0] <= start:  # unchanged within the window: `mean` is the count now, exactly
            if scale_delta(float(series.num_reqs), num_active, cfg) != 0:
                return False
            self.known[name] = (last, num_active, math.inf, -1, -1)  # no bounds to extend
            return True
        lo, hi, busy_until = series.window_counts(start)
        until = math.inf
        if lo > 0:
            least = lo * (1.0 - _MEAN_SLACK)
        elif busy_until > -math.inf:
            # A window that starts before the last positive count ended holds a piece of it at
            # least the float spacing at its end (at the last step's time if it still holds,
            # for a `now` after that step).
            until = busy_until
            least = math.ulp(last[0] if busy_until == math.inf else busy_until) / 2 / span
        else:
            least = 0.0
        proved = (
            in_range
            and len(series) <= 1_000_000  # each piece of the mean adds a rounding: 1e-10 in all
            and scale_delta(least, num_active, cfg) == 0
            and scale_delta(hi * (1.0 + _MEAN_SLACK), num_active, cfg) == 0
        )
        if proved and (until < math.inf or lo > 0 or now > last[0]):
            self.known[name] = (last, num_active, until, lo, hi)
            return True  # this mean too is within the bounds: no need to compute it
        # A last step at this very instant weighs nothing yet: this mean may be 0 (the
        # bounds hold from the next instant on), so it is computed.
        zero = scale_delta(series.mean(now, span), num_active, cfg) == 0
        if proved and zero:
            self.known[name] = (last, num_active, until, lo, hi)
        return zero

    @staticmethod
    def _extended(known: tuple, last: tuple[float, int], start: float, now: float) -> tuple | None:
        """The remembered answer `known` = (step, live, until, lo, hi), proved with 0 on
        every load in [least, hi·(1 + slack)], carried over one new step `last` (the series'
        step after `known`'s), or None. Lowest `lo` > 0 (a covered window): the new count
        within [lo, hi] leaves every later mean within the same bounds. `lo` 0 (a positive
        count in the window): a new count up to `hi` leaves the means positive while a
        positive count is in the window, with a least bound (the float spacing at its end
        over the span) no lower than the one proved, since the end only moves later."""
        prev, _, until, lo, hi = known
        c = last[1]
        if c > hi:
            return None
        if lo > 0:
            return (last, known[1], math.inf, lo, hi) if c >= lo else None
        ref = prev[0] if until == math.inf else until  # the end the least bound was taken at
        if hi <= 0 or ref <= 0.0:
            return None
        if c > 0:  # positive from now on: this mean too, once the step has some length
            return (last, known[1], math.inf, 0, hi) if now > last[0] else None
        end = last[0] if prev[1] > 0 else until  # when the last positive count ended
        return (last, known[1], end, 0, hi) if start < end else None


@dataclass(frozen=True, slots=True)
class ActiveInstance:
    instance_id: InstanceId
    created_s: float
    in_flight: int
    starting: bool = False  # its engine is not up yet


def pick_to_stop(
    candidates: Sequence[ActiveInstance], count: int, now: float, cfg: ControlConfig
) -> list[InstanceId]:
    """The `count` least-loaded instances past their protect period. A starting instance is
    never picked: a start (a cold load, a host-cache read) can outlast the protect period, and
    an engine stopped before it runs would never serve the requests already sent to it."""
    old = [c for c in candidates if now - c.created_s >= cfg.protect_period_s and not c.starting]
    old.sort(key=lambda c: (c.in_flight, c.instance_id))
    return [c.instance_id for c in old[:count]]
