"""Reactive autoscaling on concurrency averaged over a short window (reference §7)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from warmserve.control.config import ControlConfig
from warmserve.types import InstanceId


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
