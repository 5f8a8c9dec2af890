"""How long a drain will take, from what a server sees: each model's recent service times
(dispatch to completion) and how long each in-flight request has run. No request's output
length is read (a server does not know it in advance)."""

from __future__ import annotations

import bisect
from collections import deque
from itertools import accumulate

from warmserve.types import ModelName


class ServiceTimes:
    """Per model, the last `keep` service times; the expected time left of a request that has
    run `elapsed` seconds is the mean excess of the recent ones that ran longer."""

    def __init__(self, keep: int = 256) -> None:
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self._keep = keep
        self._recent: dict[ModelName, deque[float]] = {}
        # Per model, (sorted times, suffix sums) of `_recent`, rebuilt on the first read after
        # a change.
        self._sorted: dict[ModelName, tuple[list[float], list[float]]] = {}

    def add(self, model: ModelName, seconds: float) -> None:
        recent = self._recent.get(model)
        if recent is None:
            recent = self._recent[model] = deque(maxlen=self._keep)
        recent.append(seconds)
        self._sorted.pop(model, None)

    def left(self, model: ModelName, elapsed: float) -> float:
        """Expected seconds left for a request of `model` running for `elapsed` seconds: the
        mean of (t - elapsed) over recent service times t > elapsed; 0 with none such (it has
        run longer than any recent one, or nothing finished yet)."""
        cached = self._sorted.get(model)
        if cached is None:
            times = sorted(self._recent.get(model, ()))
            suffix = list(accumulate(reversed(times)))[::-1]
            cached = self._sorted[model] = (times, suffix)
        times, suffix = cached
        k = bisect.bisect_right(times, elapsed)
        n = len(times) - k
        return 0.0 if n == 0 else suffix[k] / n - elapsed
