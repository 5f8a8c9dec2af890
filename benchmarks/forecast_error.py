"""Forecaster accuracy over the Azure 2024 week: mean relative error of the 5-minute peak.

For each service and load level, one model's request stream is the trace thinned to a mean
rate (requests/s), each request lasting its isolated Llama-2-7B service time on an H100.
The forecaster runs online over the whole week (day-of-day slots, learning each window as it
closes); errors are scored from day 2 on, once a same-slot history exists. Also reported: the
naive "same window yesterday" and "previous window" forecasts, for scale.

    python benchmarks/forecast_error.py --json results/bench/forecast_error.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from bench_output import write_json

from warmserve.control.forecaster import Forecaster
from warmserve.hardware import GPU_PRESETS
from warmserve.model_spec import MODEL_PRESETS
from warmserve.sim.latency import LatencyParams, StepTimeModel
from warmserve.traces import WEEK_S, azure_2023_lengths, azure_week_counts
from warmserve.workload.builders import thinned_arrivals
from warmserve.workload.concurrency import concurrency_windows

W = 300.0


def week_windows(service: str, rate: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    week = azure_week_counts(service)
    q = rate * WEEK_S / week.sum()
    rng = np.random.default_rng(seed)
    t = thinned_arrivals(week, 0.0, WEEK_S, q, rng)
    ctx, gen = azure_2023_lengths(service)
    pick = rng.integers(0, len(ctx), len(t))
    inp, out = np.minimum(ctx[pick], 1024), np.clip(gen[pick], 3, 1023)
    step = StepTimeModel(
        MODEL_PRESETS["llama-2-7b"], 1, GPU_PRESETS["H100-SXM-80G"], LatencyParams()
    )
    dur = np.array([step.isolated_ttft(int(i)) for i in inp]) + (out - 1) * step.decode(1, 1200)
    return concurrency_windows(t, t + dur, WEEK_S, W)


def score(avg: np.ndarray, peak: np.ndarray) -> dict[str, float]:
    f = Forecaster(W, 10, "day")
    f.add_model("m", 0.0)
    preds = []
    for w in range(len(avg)):
        preds.append(f.forecast("m").peak)
        f.close_window("m", w, float(avg[w]), float(peak[w]))
    day = int(86_400 // W)
    sel = np.arange(len(peak)) >= 2 * day
    sel &= peak > 0
    pred = np.array(preds)
    rel = lambda p: float(np.mean(np.abs(p[sel] - peak[sel]) / peak[sel]))  # noqa: E731
    yesterday = np.concatenate([np.full(day, np.nan), peak[:-day]])
    previous = np.concatenate([[np.nan], peak[:-1]])
    return {
        "warmserve": round(rel(pred), 4),
        "same_window_yesterday": round(rel(yesterday), 4),
        "previous_window": round(rel(previous), 4),
        "mean_peak": round(float(peak[sel].mean()), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rates", default="0.5,5,50")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    for service in ("conv", "code"):
        for rate in (float(r) for r in args.rates.split(",")):
            avg, peak = week_windows(service, rate, seed=1)
            row = {"service": service, "rate_rps": rate, **score(avg, peak)}
            rows.append(row)
            print(json.dumps(row))
    write_json(args.json, {"benchmark": "forecast_error", "results": rows})


if __name__ == "__main__":
    main()
