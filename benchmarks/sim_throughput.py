"""Simulator speed on a long replay: events/s and simulated requests/s.

Replays the paper setup (2 x 8 H100, four Llama-2 models) for several days of the Azure
Conversation trace (default: one week) and reports wall time, events per second and simulated
requests per second for each policy. The forecaster starts from the days before each model's
start day and keeps learning online.

    python benchmarks/sim_throughput.py --days 7 --json results/bench/sim_throughput.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

from bench_output import write_json
from tqdm import tqdm

from warmserve.experiment import load_experiment
from warmserve.sim.runner import make_workload, run_policy

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--experiment", type=Path, default=ROOT / "experiments" / "paper-azure-conv.yaml"
    )
    ap.add_argument("--days", type=float, default=7.0)
    ap.add_argument("--rps", type=float, default=1.0)
    ap.add_argument("--policies", default="warmserve,vanilla-autoscale")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    exp = load_experiment(args.experiment)
    duration = args.days * 86_400
    exp = dataclasses.replace(
        exp, workload=dataclasses.replace(exp.workload, duration_s=duration, rps=args.rps)
    )
    t0 = time.perf_counter()
    wl = make_workload(exp)
    build_s = time.perf_counter() - t0
    print(f"workload: {wl.num_requests} requests over {args.days:g} days, built in {build_s:.1f} s")
    results = []
    for policy in args.policies.split(","):
        horizon = float(wl.arrival_s[-1]) + exp.workload.drain_s
        with tqdm(total=round(horizon), unit="sim s", desc=policy) as bar:
            t0 = time.perf_counter()
            r = run_policy(
                exp, policy, wl, progress=lambda t, bar=bar: bar.update(max(0, round(t) - bar.n))
            )
            wall = time.perf_counter() - t0
            bar.update(bar.total - bar.n)
        row = {
            "policy": policy,
            "wall_s": round(wall, 2),
            "events": r.num_events,
            "events_per_s": round(r.num_events / wall),
            "requests": wl.num_requests,
            "sim_requests_per_s": round(wl.num_requests / wall),
            "sim_seconds_per_wall_second": round(duration / wall),
            "ttft_p99_s": r.summary["ttft_p99_s"],
            "forecast_peak_rel_error": r.summary["forecast_peak_rel_error"],
        }
        results.append(row)
        print(json.dumps(row))
    out = {
        "benchmark": "sim_throughput",
        "days": args.days,
        "rps": args.rps,
        "workload_build_s": round(build_s, 2),
        "machine": platform.processor() or platform.machine(),
        "results": results,
    }
    write_json(args.json, out)


if __name__ == "__main__":
    main()
