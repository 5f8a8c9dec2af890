"""A node's host-to-device bandwidth, shared by the weight loads that run on it at once.

Each transfer has its own ceiling (its GPU's PCIe link, or a slower source such as an SSD or
a plain safetensors read). The node's host memory and PCIe switches deliver at most
`capacity` bytes/s in all; concurrent transfers share it max-min fairly: a transfer whose
ceiling is below the fair share keeps its ceiling and the rest is split evenly among the
others. Rates are recomputed whenever a transfer starts, ends or is cancelled, and each
transfer's completion is re-timed from the bytes it has left (a fluid model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from warmserve.sim.loop import EventLoop


@dataclass(slots=True, eq=False)
class Transfer:
    remaining: float  # bytes still to move
    ceiling: float  # bytes/s it reaches alone
    done: Callable[[], None]
    rate: float = 0.0
    version: int = 0  # bumped on every re-timing; older completion events are stale
    active: bool = True


class NodeLink:
    def __init__(self, loop: EventLoop, capacity: float | None) -> None:
        self.loop = loop
        self.capacity = capacity  # None: no node-wide limit, each transfer at its ceiling
        self.active: list[Transfer] = []
        self._last_s = loop.now()

    def start(self, nbytes: float, ceiling: float, done: Callable[[], None]) -> Transfer:
        self._advance()
        t = Transfer(float(nbytes), ceiling, done)
        self.active.append(t)
        self._retime(new=t)
        return t

    def cancel(self, t: Transfer) -> None:
        if not t.active:
            return
        self._advance()
        t.active = False
        self.active.remove(t)
        self._retime()

    def _finish(self, t: Transfer, version: int) -> None:
        if not t.active or version != t.version:
            return  # re-timed or cancelled since
        self._advance()
        t.active = False
        t.remaining = 0.0
        self.active.remove(t)
        self._retime()
        t.done()

    def _advance(self) -> None:
        now = self.loop.now()
        dt = now - self._last_s
        if dt > 0:
            for t in self.active:
                t.remaining = max(0.0, t.remaining - t.rate * dt)
        self._last_s = now

    def _retime(self, new: Transfer | None = None) -> None:
        """New fair rates; (re)schedule the completion of every transfer whose rate moved."""
        rates = fair_rates([t.ceiling for t in self.active], self.capacity)
        now = self.loop.now()
        for t, rate in zip(self.active, rates, strict=True):
            if t is not new and rate == t.rate:
                continue
            t.rate = rate
            t.version += 1
            self.loop.at(now + t.remaining / rate, self._finish, t, t.version)


def fair_rates(ceilings: list[float], capacity: float | None) -> list[float]:
    """Max-min fair shares of `capacity` for transfers with these ceilings (water filling)."""
    if capacity is None or sum(ceilings) <= capacity:
        return list(ceilings)
    out = [0.0] * len(ceilings)
    left = capacity
    order = sorted(range(len(ceilings)), key=ceilings.__getitem__)
    for k, i in enumerate(order):
        out[i] = min(ceilings[i], left / (len(order) - k))
        left -= out[i]
    return out
