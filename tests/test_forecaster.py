import math

import numpy as np
import pytest

from warmserve.control.forecaster import Forecast, Forecaster, SlotHistory, cycle_slots
from warmserve.control.load import ConcurrencySeries

W = 300.0


def periodic_day(scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Window mean and peak over a day: a diurnal sine, peak 30 % above the mean."""
    slots = cycle_slots("day", W)
    avg = scale * (20 + 15 * np.sin(2 * np.pi * np.arange(slots) / slots))
    return avg, avg * 1.3


def seeded(days: int = 3, scale: float = 1.0) -> Forecaster:
    f = Forecaster(W, 10, "day")
    hist = SlotHistory.empty(f.num_slots)
    avg, peak = periodic_day(scale)
    for _ in range(days):
        for s in range(f.num_slots):
            hist.observe(s, avg[s], peak[s])
    f.add_model("m", offset_s=0.0, history=hist)
    return f


def test_same_slot_of_earlier_days_predicts_a_repeating_day():
    f = seeded()
    avg, peak = periodic_day()
    assert f.forecast("m") == Forecast(pytest.approx(avg[0]), pytest.approx(peak[0]))
    errs = []
    for w in range(100):
        nxt = f.close_window("m", w, avg[w], peak[w])
        assert nxt.avg == pytest.approx(avg[w + 1]) and nxt.peak == pytest.approx(peak[w + 1])
        errs.append(abs(nxt.peak - peak[w + 1]))
    assert max(errs) < 1e-9
    assert np.mean(f.peak_rel_errors("m")) < 1e-9


def test_error_correction_tracks_a_level_shift():
    f = seeded()  # history says scale 1, today runs at 1.5x
    avg, peak = periodic_day(1.5)
    base_avg, _ = periodic_day(1.0)
    for w in range(20):
        nxt = f.close_window("m", w, avg[w], peak[w])
    # The 2^-d weighted mean of recent errors moves the forecast most of the way to today.
    gap_today = avg[20] - base_avg[20]
    assert nxt.avg > base_avg[20] + 0.8 * gap_today
    assert nxt.avg < avg[20] + 0.2 * gap_today


def test_correction_uses_last_k_errors_with_halving_weights():
    f = Forecaster(W, 3, "day")
    hist = SlotHistory.empty(f.num_slots)
    for s in range(f.num_slots):
        hist.observe(s, 10.0, 10.0)
    f.add_model("m", 0.0, hist)
    for w, obs in enumerate([10.0, 14.0, 18.0, 22.0]):  # errors 0, 4, 8, 12
        fc = f.close_window("m", w, obs, obs)
    # History updated by running means: slots 0..3 now (10+obs)/2; slot 4 untouched (10).
    # Last K=3 errors (vs history before update): 12, 8, 4 with weights 1, 1/2, 1/4.
    expect = 10.0 + (12 * 1 + 8 * 0.5 + 4 * 0.25) / 1.75
    assert fc.avg == pytest.approx(expect) and fc.peak == pytest.approx(expect)


def test_without_history_it_persists_and_guards_zero():
    f = Forecaster(W, 10, "week")
    f.add_model("m", 0.0)
    assert f.forecast("m") == Forecast(0.0, 0.0)
    assert Forecast(0.0, 4.0).burstiness == 1.0  # zero average: no division by zero
    assert f.close_window("m", 0, 3.0, 7.0) == Forecast(3.0, 7.0)
    assert f.num_slots == 7 * 288


def test_week_cycle_indexes_day_of_week():
    f = Forecaster(W, 10, "week")
    f.add_model("m", offset_s=2 * 86_400 + 3600)  # Wednesday 01:00
    assert f.slot("m", 0) == 2 * 288 + 12
    assert f.slot("m", 7 * 288) == f.slot("m", 0)


def test_concurrency_series_mean_and_windows():
    s = ConcurrencySeries(horizon_s=5.0)
    s.add(1.0, +1)  # 1 in flight from t=1
    s.add(2.0, +1)  # 2 from t=2
    s.add(4.0, -2)  # 0 from t=4
    assert s.mean(5.0, 5.0) == pytest.approx((1 * 1 + 2 * 2) / 5)
    assert s.mean(20.0, 5.0) == 0.0
    avg, peak = s.close_window(10.0, 10.0)
    assert avg == pytest.approx(0.5) and peak == 2
    s.add(12.0, +3)
    avg, peak = s.close_window(20.0, 10.0)
    assert avg == pytest.approx(3 * 8 / 10) and peak == 3
    with pytest.raises(AssertionError):
        s.add(21.0, -4)


def test_forecast_error_is_relative_to_observed_peak():
    f = seeded()
    avg, peak = periodic_day()
    f.close_window("m", 0, avg[0], peak[0] * 2)  # observed twice the forecast peak
    assert f.peak_rel_errors("m") == [pytest.approx(0.5)]
    assert math.isfinite(f.forecast("m").peak)
