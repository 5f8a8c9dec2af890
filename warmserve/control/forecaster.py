"""Next-window load forecast: same time slot of earlier days, plus a weighted error correction.

For window w+1 the forecast is `hist[slot(w+1)] + Σ_{d<K} e[w-d]·2^-d / Σ_{d<K} 2^-d` where
`e = observed - hist` of the recent windows (reference: K = 10). The slot table covers a whole
day (or week), not just the replayed hour, and learns from live traffic: every closed window
updates its slot's running mean, so the forecaster keeps working past the seeded history.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

_DAY_S = 86_400.0


def cycle_slots(cycle: str, window_s: float) -> int:
    """Windows in one cycle ("day" or "week") of the slot table."""
    return round((_DAY_S if cycle == "day" else 7 * _DAY_S) / window_s)


@dataclass(frozen=True, slots=True)
class Forecast:
    avg: float  # time-weighted mean concurrency expected over the window
    peak: float  # its maximum

    @property
    def burstiness(self) -> float:
        # Zero-average guard: with nothing expected on average, a peak is all burst.
        return self.peak / self.avg if self.avg > 0 else 1.0


@dataclass(slots=True)
class SlotHistory:
    """Per time slot: mean over observed cycles of the window mean and window peak."""

    avg: np.ndarray
    peak: np.ndarray
    count: np.ndarray  # cycles observed per slot

    @classmethod
    def empty(cls, num_slots: int) -> SlotHistory:
        return cls(np.zeros(num_slots), np.zeros(num_slots), np.zeros(num_slots, dtype=np.int64))

    def observe(self, slot: int, avg: float, peak: float) -> None:
        n = self.count[slot]
        self.avg[slot] = (self.avg[slot] * n + avg) / (n + 1)
        self.peak[slot] = (self.peak[slot] * n + peak) / (n + 1)
        self.count[slot] = n + 1


@dataclass(slots=True)
class _ModelState:
    name: str
    history: SlotHistory
    offset_s: float  # time of cycle (day or week) at t = 0 for this model
    errors: deque[tuple[float, float]]  # (avg error, peak error), newest last
    current: Forecast
    last_observed: Forecast | None = None
    peak_rel_errors: list[float] = field(default_factory=list)


class Forecaster:
    def __init__(
        self,
        window_s: float,
        correction_points: int,
        cycle: str = "day",
    ) -> None:
        self.window_s = window_s
        self.num_slots = cycle_slots(cycle, window_s)
        self._k = correction_points
        self._weights = [2.0**-d for d in range(correction_points)]
        self._models: dict[str, _ModelState] = {}

    def add_model(self, model: str, offset_s: float, history: SlotHistory | None = None) -> None:
        hist = history if history is not None else SlotHistory.empty(self.num_slots)
        if len(hist.avg) != self.num_slots:
            raise ValueError(
                f"history of {model!r} has {len(hist.avg)} slots, expected {self.num_slots}"
            )
        state = _ModelState(model, hist, offset_s, deque(maxlen=self._k), Forecast(0.0, 0.0))
        self._models[model] = state
        state.current = self._predict(state, 0)

    def slot(self, model: str, window_index: int) -> int:
        return self._slot(self._models[model], window_index)

    def _slot(self, state: _ModelState, window_index: int) -> int:
        return math.floor(state.offset_s / self.window_s + window_index) % self.num_slots

    def forecast(self, model: str) -> Forecast:
        return self._models[model].current

    def close_window(self, model: str, window_index: int, avg: float, peak: float) -> Forecast:
        """Record window `window_index`'s observation; return the forecast for the next one."""
        state = self._models[model]
        if peak > 0:
            state.peak_rel_errors.append(abs(state.current.peak - peak) / peak)
        slot = self._slot(state, window_index)
        hist = state.history
        if hist.count[slot] > 0:
            state.errors.append((avg - hist.avg[slot], peak - hist.peak[slot]))
        hist.observe(slot, avg, peak)
        state.last_observed = Forecast(avg, peak)
        state.current = self._predict(state, window_index + 1)
        return state.current

    def _predict(self, state: _ModelState, window_index: int) -> Forecast:
        slot = self._slot(state, window_index)
        hist = state.history
        if hist.count[slot] == 0:
            # No history for this slot yet: persistence of the last observed window.
            return state.last_observed or Forecast(0.0, 0.0)
        base_avg, base_peak = float(hist.avg[slot]), float(hist.peak[slot])
        errs = list(reversed(state.errors))  # newest first, d = 0, 1, ...
        if errs:
            w = self._weights[: len(errs)]
            norm = sum(w)
            base_avg += sum(e[0] * wi for e, wi in zip(errs, w, strict=False)) / norm
            base_peak += sum(e[1] * wi for e, wi in zip(errs, w, strict=False)) / norm
        avg = max(base_avg, 0.0)
        return Forecast(avg, max(base_peak, avg))

    def peak_rel_errors(self, model: str) -> list[float]:
        return list(self._models[model].peak_rel_errors)

    def models(self) -> list[str]:
        return list(self._models)

    def history_mean(self, model: str) -> float | None:
        """Mean window load over the slots with history (None without any): the daily average."""
        hist = self._models[model].history
        seen = hist.count > 0
        return float(hist.avg[seen].mean()) if seen.any() else None


class OracleForecaster(Forecaster):
    """Knows every window's load ahead of time: an upper bound for forecast-driven prewarming.

    `future[model]` holds the (mean, peak) concurrency of windows 0, 1, ... of the run.
    """

    def __init__(self, window_s: float, future: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        super().__init__(window_s, 1, "day")
        self._future = future

    def _predict(self, state: _ModelState, window_index: int) -> Forecast:
        avg, peak = self._future[state.name]
        if window_index >= len(avg):
            return Forecast(0.0, 0.0)
        return Forecast(float(avg[window_index]), float(peak[window_index]))
