"""Forecast history for a live server, seeded from a trace file of earlier traffic."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from warmserve.control.forecaster import SlotHistory, cycle_slots
from warmserve.traces import load_csv_trace
from warmserve.workload.concurrency import observe_intervals


def seed_histories(
    trace_path: Path,
    models: Iterable[str],
    window_s: float,
    cycle: str,
    service_s_per_token: float,
) -> dict[str, SlotHistory]:
    """Per model, the mean and peak concurrency of each time slot in the trace (times of day
    or of week in seconds); a request is busy for `output_tokens × service_s_per_token`."""
    trace = load_csv_trace(trace_path)
    slots = cycle_slots(cycle, window_s)
    span = slots * window_s
    out: dict[str, SlotHistory] = {}
    names = np.array(trace.model)
    for name in models:
        sel = names == name
        if not sel.any():
            continue
        t = trace.arrival_s[sel] % span
        ends = t + trace.output_tokens[sel] * service_s_per_token
        hist = SlotHistory.empty(slots)
        observe_intervals(hist, t, ends, span, window_s)
        out[name] = hist
    return out
