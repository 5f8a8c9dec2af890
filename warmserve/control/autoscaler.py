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
        # Per model, (last step, live count, t): it scales by 0 while neither changes and the
        # window starts before t (`now - scale_window_s < t`), if `in_range(now)`. The tick
        # reads it before calling `scale_is_zero`.
        self.known: dict[ModelName, tuple[tuple[float, int], int, float]] = {}
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
        known = self.known.get(name)
        if (
            known is not None
            and known[0] is last
            and known[1] == num_active
            and start < known[2]
            and -self.limit_s < now < self.limit_s
        ):
            return True
        if last[0] <= start:  # unchanged within the window: `mean` is the count now, exactly
            if scale_delta(float(series.num_reqs), num_active, cfg) != 0:
                return False
            self.known[name] = (last, num_active, math.inf)
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
        if (
            -self.limit_s < now < self.limit_s
            and len(series) <= 1_000_000  # each piece of the mean adds a rounding: 1e-10 in all
            and scale_delta(least, num_active, cfg) == 0
            and scale_delta(hi * (1.0 + _MEAN_SLACK), num_active, cfg) == 0
        ):
            self.known[name] = (last, num_active, until)
            if until < math.inf or lo > 0 or now > last[0]:
                return True  # this mean too is within the bounds: no need to compute it
        return scale_delta(series.mean(now, span), num_active, cfg) == 0


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
