"""Next-window load forecasts: the reference's method and an adaptive one.

`reference` (the paper's, `Forecaster`): for window w+1 the forecast is
`hist[slot(w+1)] + Σ_{d<K} e[w-d]·2^-d / Σ_{d<K} 2^-d` where `e = observed - hist` of the recent
windows (reference: K = 10). The slot table covers a whole day (or week), not just the replayed
hour, and learns from live traffic: every closed window updates its slot's running mean, so the
forecaster keeps working past the seeded history.

`adaptive` (`AdaptiveForecaster`, docs/simulator.md "Forecaster"): the window mean is a linear
combination of several forecasts of it (the previous window, a recent-level EWMA, the
reference forecast, the slot mean, and the previous window moved by the seasonal step to the
next slot as seen in the slot means, yesterday and the same weekday last week), with weights
refitted every window by exponentially forgetting ridge regression on relative errors. The
peak comes from a predictive distribution built from recent windows' peak residuals around
their own mean forecasts, scaled by sqrt(mean) (Poisson-like dispersion) and weighted towards
windows of similar load: its point forecast (the one forecast errors score) minimises the
expected relative error, and prewarming provisions for a higher quantile (default 0.9).
Everything is fitted online on the past only.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from warmserve.control.config import ControlConfig

_DAY_S = 86_400.0


def cycle_slots(cycle: str, window_s: float) -> int:
    """Windows in one cycle ("day" or "week") of the slot table."""
    return round((_DAY_S if cycle == "day" else 7 * _DAY_S) / window_s)


@dataclass(frozen=True, slots=True)
class Forecast:
    avg: float  # time-weighted mean concurrency expected over the window
    peak: float  # its maximum: what prewarming provisions for
    # The point forecast of the peak where it differs from `peak` (adaptive: the one that
    # minimises the expected relative error, while `peak` is a higher quantile).
    point_peak: float | None = None

    @property
    def scored_peak(self) -> float:
        """The peak that forecast errors score: the point forecast."""
        return self.peak if self.point_peak is None else self.point_peak

    @property
    def burstiness(self) -> float:
        # Zero-average guard: with nothing expected on average, a peak is all burst.
        return self.peak / self.avg if self.avg > 0 else 1.0


RECENT_CYCLES = 7  # per slot, the latest observations kept: a week of days


@dataclass(slots=True)
class SlotHistory:
    """Per time slot: mean over observed cycles of the window mean and window peak, and the
    latest `RECENT_CYCLES` observations themselves (a ring, oldest overwritten)."""

    avg: np.ndarray
    peak: np.ndarray
    count: np.ndarray  # cycles observed per slot
    recent_avg: np.ndarray = field(init=False, repr=False)
    recent_peak: np.ndarray = field(init=False, repr=False)
    known: np.ndarray = field(init=False, repr=False)  # observations ever written to the ring

    def __post_init__(self) -> None:
        # Built from means (a count > 0 with an empty ring): no single cycle is known.
        self.recent_avg = np.zeros((len(self.avg), RECENT_CYCLES))
        self.recent_peak = np.zeros((len(self.avg), RECENT_CYCLES))
        self.known = np.zeros(len(self.avg), dtype=np.int64)

    @classmethod
    def empty(cls, num_slots: int) -> SlotHistory:
        return cls(np.zeros(num_slots), np.zeros(num_slots), np.zeros(num_slots, dtype=np.int64))

    def copy(self) -> SlotHistory:
        out = SlotHistory(self.avg.copy(), self.peak.copy(), self.count.copy())
        out.recent_avg = self.recent_avg.copy()
        out.recent_peak = self.recent_peak.copy()
        out.known = self.known.copy()
        return out

    def observe(self, slot: int, avg: float, peak: float) -> None:
        n = self.count[slot]
        self.avg[slot] = (self.avg[slot] * n + avg) / (n + 1)
        self.peak[slot] = (self.peak[slot] * n + peak) / (n + 1)
        self.count[slot] = n + 1
        k = self.known[slot]
        self.recent_avg[slot, k % RECENT_CYCLES] = avg
        self.recent_peak[slot, k % RECENT_CYCLES] = peak
        self.known[slot] = k + 1

    def ago(self, slot: int, cycles: int) -> float | None:
        """The window mean observed in `slot` `cycles` observations back (1: the latest), if
        still kept."""
        k = int(self.known[slot])
        if not 1 <= cycles <= min(k, RECENT_CYCLES):
            return None
        return float(self.recent_avg[slot, (k - cycles) % RECENT_CYCLES])

    def complete_cycles(self) -> int:
        """Whole cycles kept for every slot (the ring's depth that `ago` can replay)."""
        return int(min(self.known.min(), RECENT_CYCLES)) if len(self.known) else 0


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
        self.cycle = cycle
        self.num_slots = cycle_slots(cycle, window_s)
        self._k = correction_points
        self._weights = [2.0**-d for d in range(correction_points)]
        self._models: dict[str, _ModelState] = {}

    def add_model(self, model: str, offset_s: float, history: SlotHistory | None = None) -> None:
        # The forecaster learns into its own copy: the caller's history stays as given (the
        # simulator replays one workload under several policies, which must not see each
        # other's observations).
        hist = history.copy() if history is not None else SlotHistory.empty(self.num_slots)
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


@dataclass(frozen=True, slots=True)
class AdaptiveParams:
    """Settings of `AdaptiveForecaster`; principled defaults, not fitted to a trace."""

    level_half_life: float = 2.0  # windows: the recent-level EWMA
    fit_half_life_s: float = _DAY_S  # forgetting of the combination's regression
    ridge: float = 0.1  # pull of the combination weights towards equal weights
    residual_span_s: float = 2 * _DAY_S  # recent windows whose peak residuals form the spread
    min_residuals: int = 12  # fewer: the peak is the reference method's
    dispersion_offset: float = 0.1  # spread scales with sqrt(mean + this): idle windows
    similarity: float = 0.5  # kernel width, in log mean, weighting residuals of similar load
    warm_start_s: float = 2 * _DAY_S  # seeded history replayed at add_model to fit the above
    scale_floor: float = 1e-2  # requests: relative errors below this level count as this


# Forecasts of the next window's mean: the previous window, the recent level, the reference
# method's, the slot mean, and the previous window moved by the step to the next slot in the
# slot means, yesterday, and the same weekday last week. The first two always exist.
_FEATURES = 7
_EYE = [np.eye(n) for n in range(_FEATURES + 1)]


@dataclass(slots=True)
class _AdaptiveState(_ModelState):
    level: float | None = None  # EWMA of recent window means
    # Per set of forecasts available (missing ones are left out, not imputed): the forgetting
    # least-squares statistics (Σ x xᵀ, Σ x y) of the scaled forecasts x and outcomes y.
    fits: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    features: np.ndarray | None = None  # of the forecast in `current`, scaled
    available: tuple[int, ...] = ()  # which forecasts `features` holds
    scale: float = 1.0
    residuals: deque[tuple[float, float]] = field(default_factory=deque)  # (mean fc, peak)


class AdaptiveForecaster(Forecaster):
    """Seasonal + level + error-correction forecasts of the window mean, combined with weights
    fitted online; the peak as a quantile of the window's predictive distribution.

    Two peaks come from that distribution: the point forecast (`Forecast.point_peak`, which
    forecast errors score) is the peak that minimises the expected relative error (the median
    weighted by 1/peak); `Forecast.peak`, what prewarming provisions for, is its
    `peak_quantile` quantile (under-predicting a peak costs TTFT, over-predicting it memory).
    With `peak_quantile=None` both are the point forecast. Peaks are whole numbers of requests
    in flight, forecast given that the window has any traffic.
    """

    def __init__(
        self,
        window_s: float,
        correction_points: int,
        cycle: str = "day",
        peak_quantile: float | None = 0.9,
        params: AdaptiveParams | None = None,
    ) -> None:
        super().__init__(window_s, correction_points, cycle)
        if peak_quantile is not None and not 0 < peak_quantile < 1:
            raise ValueError("peak_quantile must be in (0, 1)")
        self.peak_quantile = peak_quantile
        self.params = p = params or AdaptiveParams()
        self._day_slots = round(_DAY_S / window_s)
        self._week_lag = max(1, round(7 * _DAY_S / (self.num_slots * window_s)))
        self._level_alpha = 1.0 - 0.5 ** (1.0 / p.level_half_life)
        self._forget = 0.5 ** (window_s / p.fit_half_life_s)
        self._span = max(1, round(p.residual_span_s / window_s))

    def add_model(self, model: str, offset_s: float, history: SlotHistory | None = None) -> None:
        # The forecaster learns into its own copy: the caller's history stays as given (the
        # simulator replays one workload under several policies, which must not see each
        # other's observations).
        hist = history.copy() if history is not None else SlotHistory.empty(self.num_slots)
        if len(hist.avg) != self.num_slots:
            raise ValueError(
                f"history of {model!r} has {len(hist.avg)} slots, expected {self.num_slots}"
            )
        state = self._new_state(model, hist, offset_s)
        self._warm_start(state)
        self._models[model] = state
        slot = self._slot(state, 0)
        if hist.count[slot] > 0:
            state.current = self._forecast(state, float(hist.avg[slot]), float(hist.peak[slot]))

    def _new_state(self, model: str, hist: SlotHistory, offset_s: float) -> _AdaptiveState:
        return _AdaptiveState(
            model,
            hist,
            offset_s,
            deque(maxlen=self._k),
            Forecast(0.0, 0.0),
            residuals=deque(maxlen=self._span),
        )

    def _warm_start(self, state: _AdaptiveState) -> None:
        """Fit the combination and the peak spread by running over the seeded history's latest
        whole cycles, oldest first: only the past, as if the forecaster had been running."""
        hist = state.history
        kept = hist.complete_cycles()
        replayed = min(kept, math.ceil(self.params.warm_start_s / self.window_s / self.num_slots))
        if replayed == 0:
            return
        replay = self._new_state(state.name, SlotHistory.empty(self.num_slots), 0.0)
        w = 0
        for c in range(kept, 0, -1):  # older cycles only fill the replay's slot table
            idx = (hist.known - c) % RECENT_CYCLES
            for slot in range(self.num_slots):
                avg, peak = hist.recent_avg[slot, idx[slot]], hist.recent_peak[slot, idx[slot]]
                if c > replayed:
                    replay.history.observe(slot, float(avg), float(peak))
                else:
                    self._close(replay, w, float(avg), float(peak), predict_peak=False)
                    w += 1
        state.fits = replay.fits
        state.residuals = replay.residuals

    def close_window(self, model: str, window_index: int, avg: float, peak: float) -> Forecast:
        """Record window `window_index`'s observation; return the forecast for the next one."""
        state = self._models[model]
        assert isinstance(state, _AdaptiveState)
        if peak > 0:
            state.peak_rel_errors.append(abs(state.current.scored_peak - peak) / peak)
        self._close(state, window_index, avg, peak, predict_peak=True)
        return state.current

    def _close(
        self, st: _AdaptiveState, w: int, avg: float, peak: float, *, predict_peak: bool
    ) -> None:
        hist = st.history
        if st.features is not None:
            # Score the forecast made for this window: a regression sample and a peak residual.
            x, n = st.features, len(st.features)
            gram, moment = st.fits.get(st.available, (np.zeros((n, n)), np.zeros(n)))
            gram = self._forget * gram + np.outer(x, x)
            st.fits[st.available] = (gram, self._forget * moment + x * (avg / st.scale))
            st.residuals.append((st.current.avg, peak))
        slot = self._slot(st, w)
        if hist.count[slot] > 0:
            st.errors.append((avg - hist.avg[slot], peak - hist.peak[slot]))
        st.last_observed = Forecast(avg, peak)
        st.level = avg if st.level is None else st.level + self._level_alpha * (avg - st.level)
        cands = self._candidates(st, w, avg)  # before this window enters the slot table
        ref = self._reference(st, w + 1)
        hist.observe(slot, avg, peak)
        st.available = tuple(i for i, c in enumerate(cands) if c is not None)
        x = np.array([c for c in cands if c is not None])
        st.scale = max(float(np.abs(x).mean()), self.params.scale_floor)
        st.features = x = x / st.scale
        n = len(x)
        gram, moment = st.fits.get(st.available, (np.zeros((n, n)), np.zeros(n)))
        r = self.params.ridge  # towards equal weights
        weights = np.linalg.solve(gram + r * _EYE[n], moment + r / n)
        mean = max(float(x @ weights) * st.scale, 0.0)
        st.current = self._forecast(st, mean, ref.peak) if predict_peak else Forecast(mean, mean)

    def _candidates(self, st: _AdaptiveState, w: int, avg: float) -> list[float | None]:
        """The `_FEATURES` forecasts of window w+1's mean at window w's close (None: no data)."""
        hist, n = st.history, self.num_slots
        s0, s1 = self._slot(st, w), self._slot(st, w + 1)
        seen0, seen1 = hist.count[s0] > 0, hist.count[s1] > 0
        shift = self._day_slots % n  # yesterday's same time: same slot (day cycle) or 1 day back

        def step(before: float | None, after: float | None) -> float | None:
            return None if before is None or after is None else avg + after - before

        assert st.level is not None
        return [
            avg,
            st.level,
            self._reference(st, w + 1).avg if seen1 else None,
            float(hist.avg[s1]) if seen1 else None,
            step(float(hist.avg[s0]), float(hist.avg[s1])) if seen0 and seen1 else None,
            step(hist.ago((s0 - shift) % n, 1), hist.ago((s1 - shift) % n, 1)),
            step(hist.ago(s0, self._week_lag), hist.ago(s1, self._week_lag)),
        ]

    def _reference(self, st: _ModelState, window_index: int) -> Forecast:
        return Forecaster._predict(self, st, window_index)

    def _forecast(self, st: _AdaptiveState, mean: float, fallback_peak: float) -> Forecast:
        """The forecast for the next window given its mean: the peak from its predictive
        distribution, built from recent residuals (the reference's peak until there are few)."""
        p = self.params
        res = np.array([r for r in st.residuals if r[1] > 0]).reshape(-1, 2)
        if len(res) < p.min_residuals:
            return Forecast(mean, max(fallback_peak, mean))
        fc, obs = res[:, 0], res[:, 1]
        k = p.dispersion_offset
        z = (obs - fc) / np.sqrt(fc + k)
        values = np.maximum(np.round(mean + z * math.sqrt(mean + k)), 1.0)
        weights = np.exp(-((np.log(fc + k) - math.log(mean + k)) ** 2) / (2 * p.similarity**2))
        point = max(_weighted_quantile(values, weights / values, 0.5), mean)
        if self.peak_quantile is None:
            return Forecast(mean, point)
        high = max(_weighted_quantile(values, weights, self.peak_quantile), mean)
        return Forecast(mean, high, point)


def _weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(weights[order])
    i = min(int(np.searchsorted(cum, q * cum[-1])), len(cum) - 1)
    return float(values[order][i])


def make_forecaster(cfg: ControlConfig) -> Forecaster:
    """The forecaster `cfg.forecast_method` names, with the config's window and cycle."""
    if cfg.forecast_method == "reference":
        return Forecaster(cfg.forecast_window_s, cfg.forecast_correction_points, cfg.forecast_cycle)
    return AdaptiveForecaster(
        cfg.forecast_window_s,
        cfg.forecast_correction_points,
        cfg.forecast_cycle,
        cfg.forecast_peak_quantile,
    )


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
