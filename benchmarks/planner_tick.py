"""Control-plane cost at scale: one planner pass over 1,024 GPUs and 256 models.

Builds a cluster of 128 nodes x 8 H100 (2 MiB pages) serving 256 models of mixed size
(Llama-2 7B TP1, 13B TP2, 70B TP4 and TP8), draws forecasts, and times:
  cold   - the first plan on an empty cluster (places every replica wanted),
  steady - a plan on the populated cluster with the same forecasts,
  shift  - a plan after every forecast moves by up to ±30 %,
  tick   - the rest of a control tick: autoscaler decisions for all models.
Target: a tick well under 100 ms.

    python benchmarks/planner_tick.py --json results/bench/planner_tick.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from bench_output import write_json
from helpers import apply_plan

from warmserve.control.api import ClusterSnapshot, GpuView, ServedModel
from warmserve.control.autoscaler import scale_delta
from warmserve.control.config import ControlConfig
from warmserve.control.forecaster import Forecast
from warmserve.control.load import ConcurrencySeries
from warmserve.control.planner import PlanInput, plan_evict_aware
from warmserve.hardware import PAGE_BYTES, pages_for
from warmserve.model_spec import MODEL_PRESETS
from warmserve.profiles import load_profile
from warmserve.types import ModelName

KINDS = [
    ("llama-2-7b", 1, 0.6),
    ("llama-2-13b", 2, 0.25),
    ("llama-2-70b", 4, 0.1),
    ("llama-2-70b", 8, 0.05),
]


def build(num_nodes: int, num_models: int, rng: np.random.Generator):
    gpu = load_profile("h100-sxm-80g").device
    pages = int(gpu.memory_bytes * 0.9) // PAGE_BYTES
    gpus = tuple(GpuView(g, g // 8, pages, pages, None) for g in range(num_nodes * 8))
    snap = ClusterSnapshot(gpus, (), (), 8)
    models = []
    kinds = rng.choice(len(KINDS), size=num_models, p=[k[2] for k in KINDS])
    for i, k in enumerate(kinds):
        preset, tp, _ = KINDS[k]
        spec = MODEL_PRESETS[preset]
        models.append(
            ServedModel(
                ModelName(f"m{i}"),
                tp,
                pages_for(spec.shard_bytes(tp)),
                spec.shard_bytes(tp),
                spec.kv_bytes_per_token_per_gpu(tp),
                2048,
            )
        )
    # Popularity ~ power law; average concurrency up to a few instances' worth, bursty peaks.
    avg = 80.0 * (np.arange(num_models) + 1.0) ** -0.8 * rng.lognormal(0, 0.5, num_models)
    peak = avg * (1 + rng.gamma(2.0, 0.6, num_models))
    fc = {m.name: Forecast(float(a), float(p)) for m, a, p in zip(models, avg, peak, strict=True)}
    return snap, models, fc


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--nodes", type=int, default=128)
    ap.add_argument("--models", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    snap, models, fc = build(args.nodes, args.models, rng)
    by_name = {m.name: m for m in models}
    counter = iter(range(10**9))

    def plan(s, f):
        inp = PlanInput(s, by_name, f, {}, 32e9, 32)
        return plan_evict_aware(inp, counter.__next__)

    cold_ms, cold = timed(lambda: plan(snap, fc), args.repeats)
    populated = apply_plan(snap, cold.actions, by_name)
    steady_ms, steady = timed(lambda: plan(populated, fc), args.repeats)
    shifted = {
        k: Forecast(v.avg * rng.uniform(0.7, 1.3), v.peak * rng.uniform(0.7, 1.3))
        for k, v in fc.items()
    }
    shift_ms, shift = timed(lambda: plan(populated, shifted), args.repeats)

    cfg = ControlConfig()
    series = [ConcurrencySeries(cfg.scale_window_s) for _ in models]
    for k, s in enumerate(series):
        for t in np.sort(rng.uniform(0, 5, 20)):
            s.add(float(t), +1 if k % 3 else 0)
    tick_ms, _ = timed(
        lambda: [scale_delta(s.mean(5.0, 5.0), 1, cfg) for s in series], args.repeats
    )

    free = np.array([g.free_pages for g in populated.gpus])
    row = {
        "gpus": len(snap.gpus),
        "models": len(models),
        "replicas_wanted_cold": len(cold.actions),
        "cold_plan_ms": round(cold_ms, 2),
        "steady_plan_ms": round(steady_ms, 2),
        "steady_new_replicas": len(steady.actions),
        "shifted_plan_ms": round(shift_ms, 2),
        "shifted_new_replicas": len(shift.actions),
        "autoscaler_all_models_ms": round(tick_ms, 3),
        "tick_ms_worst": round(max(steady_ms, shift_ms) + tick_ms, 2),
        "memory_used_after_cold_plan": round(
            1 - free.sum() / (len(free) * snap.gpus[0].total_pages), 3
        ),
    }
    print(json.dumps(row, indent=2))
    write_json(args.json, {"benchmark": "planner_tick", **row})


if __name__ == "__main__":
    main()
