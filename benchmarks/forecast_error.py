"""Forecaster accuracy: mean relative error of the 5-minute peak concurrency, every method.

Traces: Azure LLM inference 2024 Conversation and Coding (one week, Monday first), and ServeGen
m-mid's busiest client (60: 14 days, 10-minute rates and inter-arrival CVs). For each trace and
mean rate (requests/s over the whole trace), one model's request stream is the trace thinned
(Azure) or its renewal process scaled (ServeGen) to that rate, each request lasting its
isolated Llama-2-7B service time on an H100 (as the simulator's forecast history). Windows are
300 s; each window's mean and peak are the time-weighted mean and the maximum of the number of
requests in flight.

Every forecaster runs online from an empty history over the whole trace, learning each window
as it closes, so a forecast only ever uses earlier windows. The metric is the existing one:
the mean over scored windows of |forecast peak - observed peak| / observed peak. Scored: every
window with any traffic from day 2 on (Azure) or day 7 on (ServeGen: the first day every naive
baseline, including last week's, has a value). `under` and `over` split the error into its
under- and over-predicted parts (under + over = error); `under_share` is the share of scored
windows whose peak was under-predicted.

Methods: `reference` (the paper's forecaster), `adaptive` (the default forecaster's point
forecast: the peak that minimises the expected relative error, what the simulator's forecast
error scores), `adaptive_provisioned` (the same forecaster's `Forecast.peak`, the 0.9 quantile
that prewarming provisions for: fewer under-predicted peaks), and the naive forecasts
`previous_window`, `same_window_yesterday` and `same_window_last_week` (not on the one-week
Azure traces).

    python benchmarks/forecast_error.py --json results/bench/forecast_error.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from bench_output import write_json

from warmserve.control.config import ControlConfig
from warmserve.control.forecaster import Forecaster, make_forecaster
from warmserve.model_spec import MODEL_PRESETS
from warmserve.profiles import load_profile
from warmserve.sim.latency import LatencyParams, StepTimeModel
from warmserve.traces import (
    WEEK_S,
    azure_2023_lengths,
    azure_week_counts,
    servegen_clients,
)
from warmserve.workload.builders import (
    ServeGenSpec,
    _servegen_lengths,
    _servegen_stream,
    thinned_arrivals,
)
from warmserve.workload.concurrency import concurrency_windows

W = 300.0
DAY_S = 86_400
DAY = int(DAY_S // W)
TRACES = ("conv", "code", "servegen")
NAIVE = ("previous_window", "same_window_yesterday", "same_window_last_week")
MODELS = ("reference", "adaptive", "adaptive_provisioned")
STEP = StepTimeModel(
    MODEL_PRESETS["llama-2-7b"], 1, load_profile("h100-sxm-80g").device, LatencyParams()
)

DayStream = Callable[[int], tuple[np.ndarray, np.ndarray]]  # day -> (arrivals, durations)


def _by_day(day_stream: DayStream, days: int) -> tuple[np.ndarray, np.ndarray]:
    """Window means and peaks, a day at a time (bounded memory at 50 req/s); requests still
    running at midnight carry over into the next day."""
    avgs, peaks = [], []
    carry = np.zeros(0)
    for d in range(days):
        t, dur = day_stream(d)
        starts = np.concatenate([np.zeros(len(carry)), t])
        ends = np.concatenate([carry, t + dur])
        avg, peak = concurrency_windows(starts, ends, DAY_S, W)
        carry = ends[ends > DAY_S] - DAY_S
        avgs.append(avg)
        peaks.append(peak)
    return np.concatenate(avgs), np.concatenate(peaks)


def azure_windows(service: str, rate: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    week = azure_week_counts(service)
    q = rate * WEEK_S / week.sum()
    rng = np.random.default_rng(seed)
    ctx, gen = azure_2023_lengths(service)

    def day(d: int) -> tuple[np.ndarray, np.ndarray]:
        t = thinned_arrivals(week, d * DAY_S, DAY_S, q, rng)
        pick = rng.integers(0, len(ctx), len(t))
        inp, out = np.minimum(ctx[pick], 1024), np.clip(gen[pick], 3, 1023)
        return t, STEP.isolated_service_s(inp, out)

    return _by_day(day, WEEK_S // DAY_S)


def servegen_windows(rate: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    clients = servegen_clients("m-mid")
    client = clients[0]  # the busiest, as the simulator's first ServeGen deployment
    q = rate / float(client.rate.mean())
    spec = ServeGenSpec("m-mid", rate, 0, 0.0, DAY_S, 1024, 3, 1023)
    rng = np.random.default_rng(seed)

    def day(d: int) -> tuple[np.ndarray, np.ndarray]:
        t = _servegen_stream(client, d * DAY_S, DAY_S, q, rng)
        inp, out = _servegen_lengths(clients, client, t + d * DAY_S, spec, 2048, rng)
        return t, STEP.isolated_service_s(inp, out)

    return _by_day(day, len(client.rate) * 600 // DAY_S)


def windows(trace: str, rate: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    return servegen_windows(rate, seed) if trace == "servegen" else azure_windows(trace, rate, seed)


def online_peaks(f: Forecaster, avg: np.ndarray, peak: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each window's point and provisioned peak forecasts, made before it opened from the
    earlier windows only."""
    f.add_model("m", 0.0)
    point, provisioned = np.empty(len(peak)), np.empty(len(peak))
    for w in range(len(peak)):
        fc = f.forecast("m")
        point[w], provisioned[w] = fc.scored_peak, fc.peak
        f.close_window("m", w, float(avg[w]), float(peak[w]))
    return point, provisioned


def forecasts(avg: np.ndarray, peak: np.ndarray) -> dict[str, np.ndarray]:
    def lag(k: int) -> np.ndarray:
        return np.concatenate([np.full(k, np.nan), peak[:-k]])

    cfg = ControlConfig()  # the defaults: adaptive, provisioning the 0.9 quantile
    adaptive = online_peaks(make_forecaster(cfg), avg, peak)
    return {
        "reference": online_peaks(Forecaster(W, 10, "day"), avg, peak)[0],
        "adaptive": adaptive[0],
        "adaptive_provisioned": adaptive[1],
        "previous_window": lag(1),
        "same_window_yesterday": lag(DAY),
        "same_window_last_week": lag(7 * DAY),
    }


def scores(pred: np.ndarray, peak: np.ndarray, sel: np.ndarray) -> dict[str, float] | None:
    """The benchmark's metric on the scored windows (None where the method has no forecast)."""
    p, y = pred[sel], peak[sel]
    if np.isnan(p).any():
        return None
    return {
        "error": round(float(np.mean(np.abs(p - y) / y)), 4),
        "under": round(float(np.mean(np.maximum(y - p, 0) / y)), 4),
        "over": round(float(np.mean(np.maximum(p - y, 0) / y)), 4),
        "under_share": round(float(np.mean(p < y)), 4),
    }


def evaluate(trace: str, rate: float, seed: int) -> dict[str, object]:
    avg, peak = windows(trace, rate, seed)
    first = (7 if trace == "servegen" else 2) * DAY
    sel = (np.arange(len(peak)) >= first) & (peak > 0)
    methods = {k: scores(v, peak, sel) for k, v in forecasts(avg, peak).items()}
    naive = {k: v["error"] for k in NAIVE if (v := methods[k]) is not None}
    best = min(naive, key=naive.__getitem__)
    adaptive = methods["adaptive"]
    assert adaptive is not None
    return {
        "trace": trace,
        "rate_rps": rate,
        "scored_windows": int(sel.sum()),
        "mean_peak": round(float(peak[sel].mean()), 2),
        "methods": methods,
        "best_naive": best,
        "adaptive_beats_best_naive": adaptive["error"] < naive[best],
    }


def table(rows: list[dict[str, object]]) -> str:
    head = "| trace | rps | " + " | ".join(MODELS + NAIVE) + " |"
    lines = [head, "|" + "---|" * (2 + len(MODELS) + len(NAIVE))]
    for r in rows:
        cells = []
        methods = r["methods"]
        assert isinstance(methods, dict)
        for m in MODELS + NAIVE:
            s = methods[m]
            cells.append("n/a" if s is None else f"{s['error']:.1%} ({s['under']:.1%})")
        lines.append(f"| {r['trace']} | {r['rate_rps']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rates", default="0.5,5,50")
    ap.add_argument("--traces", default=",".join(TRACES))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    for trace in args.traces.split(","):
        for rate in (float(r) for r in args.rates.split(",")):
            t0 = time.perf_counter()
            row = evaluate(trace, rate, args.seed)
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\nmean relative error of the 5-min peak (under-predicted part in brackets)")
    print(table(rows))
    write_json(args.json, {"benchmark": "forecast_error", "seed": args.seed, "results": rows})


if __name__ == "__main__":
    main()
