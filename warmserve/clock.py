"""Time as a dependency: the control plane never reads the system clock itself."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since an arbitrary, fixed origin."""
        ...


class SimClock:
    """Simulated time, advanced only by the event loop."""

    __slots__ = ("_now",)

    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance_to(self, t: float) -> None:
        assert t >= self._now, f"time went backwards: {t} < {self._now}"
        self._now = t


class WallClock:
    """Monotonic wall time, with the origin at construction."""

    __slots__ = ("_origin",)

    def __init__(self) -> None:
        self._origin = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self._origin


def seconds_into_day() -> float:
    """UTC time of day now, in seconds: where a live forecaster's daily slots start."""
    return time.time() % 86_400.0


def seconds_into_week() -> float:
    """UTC time since Monday 00:00 now, in seconds (the epoch fell on a Thursday)."""
    return (time.time() + 3 * 86_400.0) % (7 * 86_400.0)


def unix_time() -> int:
    """Seconds since the epoch, for timestamps in API responses (`created`)."""
    return int(time.time())
