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


class QuietModels:
    """Which models a tick's autoscaling would leave alone: with no request queued, the
    autoscaler acts only on a non-zero `scale_delta` of the windowed load, which is tested here
    as `Controller._autoscale` would test it, without the call. A model whose load did not
    change within the window has the mean of its count now until its next change (a new last
    step): with the same live count, the same 0, remembered without computing the mean."""

    __slots__ = ("_cfg", "_known", "_load")

    def __init__(self, load: dict[ModelName, ConcurrencySeries], cfg: ControlConfig) -> None:
        self._load = load
        self._cfg = cfg
        self._known: dict[ModelName, tuple[tuple[float, int], int]] = {}  # (last step, live)

    def scale_is_zero(self, name: ModelName, num_active: int, now: float) -> bool:
        series = self._load[name]
        last = series.last_step
        known = self._known.get(name)
        if known is not None and known[0] is last and known[1] == num_active:
            return True
        span = self._cfg.scale_window_s
        if scale_delta(series.mean(now, span), num_active, self._cfg) != 0:
            return False
        if last[0] <= now - span:  # unchanged within the window: `mean` is the count now
            self._known[name] = (last, num_active)
        return True


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
