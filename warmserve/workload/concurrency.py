"""Busy intervals (a request from arrival to finish) as per-window load and forecast history."""

from __future__ import annotations

import numpy as np

from warmserve.control.forecaster import SlotHistory


def concurrency_windows(
    starts: np.ndarray, ends: np.ndarray, span_s: float, window_s: float
) -> tuple[np.ndarray, np.ndarray]:
    """Time-weighted mean and peak of the number of open intervals, per window of [0, span)."""
    n_win = int(np.ceil(span_s / window_s))
    bounds = np.arange(n_win + 1) * window_s
    t = np.concatenate([starts, np.minimum(ends, span_s), bounds])
    d = np.concatenate([np.ones(len(starts)), -np.ones(len(ends)), np.zeros(len(bounds))])
    order = np.lexsort((d, t))  # at equal times, ends before starts
    t, d = t[order], d[order]
    level = np.cumsum(d)
    seg = np.diff(t, append=t[-1])
    win = np.minimum((t // window_s).astype(np.int64), n_win - 1)
    avg = np.bincount(win, weights=level * seg, minlength=n_win) / window_s
    peak = np.zeros(n_win)
    np.maximum.at(peak, win, level)
    return avg, peak


def observe_intervals(
    hist: SlotHistory,
    starts: np.ndarray,
    ends: np.ndarray,
    span_s: float,
    window_s: float,
    first_slot: int = 0,
) -> None:
    """Add the windows of [0, span) to `hist` from slot `first_slot` on: each window's mean
    and peak concurrency of the intervals."""
    avg, peak = concurrency_windows(starts, ends, span_s, window_s)
    for w in range(len(avg)):
        hist.observe(first_slot + w, float(avg[w]), float(peak[w]))
