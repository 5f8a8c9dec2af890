"""Does the simulator predict the real server? The same requests through both, TTFT compared.

One slice of the Azure Conversation trace (as `serve_burst.py` replays it: three SmolLM2 copies
on two CPU workers, compressed in time) goes through `warmserve serve` several times, and once
through the simulator configured from a device profile (default: the calibrated CPU profile)
and the same serve settings - models, workers, page pool, policy, control settings, forecast
history - with exactly the arrivals and lengths the client sent (`warmserve/sim/from_serve.py`).
For each offered rate it reports TTFT P50/P90/P99 real (all repeats pooled) and simulated, the
relative errors, and the real run-to-run spread (min-max of each percentile over the repeats),
and it plots the two CDFs. The gateway's host CPU per streamed token (this process: gateway,
control plane and the bench client, which share the host's cores with the workers) is measured
too, as the number a CPU profile's `host.gateway_s_per_token` should hold. So are the other
jobs on the host: the workers' run-queue wait over their CPU time (the kernel's schedstat)
gives the cores they lost, as `host.background_threads` (calibration/host_load.py); the
simulation runs with the measured figure, and once more on a dedicated host (none). The other
jobs come in bursts, so the counters are also sampled through each run (every
`--sample-s`): each run is simulated once more with its own series of shares as
`host.background_schedule` (the `sim_series_*` figures), beside the constant share.

    python benchmarks/fidelity.py --json results/bench/fidelity.json   # ~60 min
    python benchmarks/fidelity.py --quick                               # 10-15 min: 1 rate, 2 runs
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from bench_output import write_json
from serve_burst import MODELS, free_port, history_csv, starts

from warmserve.bench import BenchConfig, build_workload, check_endpoint, replay
from warmserve.calibration.host_load import (
    SchedSampler,
    background_series,
    background_threads,
    sched_seconds,
)
from warmserve.clock import seconds_into_day
from warmserve.models import prepare_smollm2
from warmserve.serve_config import ServeConfig, parse_serve_config
from warmserve.server import BackgroundServer
from warmserve.sim.from_serve import replay_workload, serve_experiment
from warmserve.sim.runner import run_policy

PCTS = (50, 90, 99)


@dataclasses.dataclass(frozen=True, slots=True)
class RealRun:
    ttft_s: np.ndarray  # per request, NaN where it failed
    warmup_s: float  # the server's control loop ran this long before the first request
    start_of_day_s: float  # time of day the replay started
    gateway_cpu_s_per_token: float
    tokens: int
    server_ttft_mean_s: float  # the runtime's own TTFT (submit to first token), no HTTP
    starts: dict[str, int]
    # The workers' run-queue stretch ((CPU + run-queue wait) / CPU) and the other jobs' share
    # of the host it implies (see `background_threads`); NaN where not measured.
    worker_stretch: float = float("nan")
    background_threads: float = float("nan")
    # The same through the run, per sampled interval, as `host.background_schedule` (seconds
    # from the replay's start, the simulator's time of the first arrival's clock); and the
    # whole-run formula over the run's totals, for comparison with the mean of the series.
    background_schedule: tuple[tuple[float, float], ...] = ()
    background_threads_whole_run: float = float("nan")


def serve_config(model_dir: Path, hist: Path, args: argparse.Namespace, port: int) -> ServeConfig:
    """serve_burst.py's warmserve mode."""
    raw = {
        "listen": {"port": port},
        "workers": {"count": 2, "pool_mib": args.pool_mib},
        "models": [{"name": n, "path": str(model_dir), "max_model_len": 1024} for n in MODELS],
        "policy": args.policy,
        "control": {"capacity_per_instance": args.capacity, "forecast_window_s": 60.0},
        "forecast": {"history": str(hist), "service_s_per_token": 0.1 * args.time_scale},
    }
    return parse_serve_config(raw, Path())


def run_real(cfg: ServeConfig, bench: BenchConfig, settle_s: float, sample_s: float) -> RealRun:
    with BackgroundServer(cfg) as srv:
        up = time.perf_counter()
        time.sleep(settle_s)  # the planner prewarms from the seeded forecast
        b = dataclasses.replace(bench, endpoint=srv.url)
        check_endpoint(b)
        wl = build_workload(b)
        day = seconds_into_day()
        warmup = time.perf_counter() - up
        before, starts0 = ttft_sums(srv.url), starts(srv.url)
        pids = [w.pid for w in srv.server.runtime.supervisor.workers if w is not None]
        pids = [p for p in pids if p is not None]
        sched0 = [sched_seconds(p) for p in pids]
        cpu0, wall0 = time.process_time(), time.perf_counter()
        sampler = SchedSampler(pids, sample_s)
        sampler.start()
        results = asyncio.run(replay(b, wl, quiet=True))
        samples = sampler.finish()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        sched1 = [sched_seconds(p) for p in pids]
        after, starts1 = ttft_sums(srv.url), starts(srv.url)
    ttft = np.array([r.first_s if r.error is None else np.nan for r in results])
    tokens = sum(r.tokens for r in results if r.error is None)
    n = after[1] - before[1]
    server = (after[0] - before[0]) / n if n else float("nan")
    started = {k: v - starts0.get(k, 0) for k, v in starts1.items()}
    # A worker restarted during the run has new counters: its difference is meaningless.
    used = [(c1 - c0, w1 - w0) for (c0, w0), (c1, w1) in zip(sched0, sched1, strict=True)
            if c1 >= c0 and w1 >= w0]  # fmt: skip
    cores = float(len(os.sched_getaffinity(0)))
    whole, _ = background_threads(used, cpu, wall, cores)
    # The run's figure is the series' mean (one formula for both), so the constant-share and
    # the series simulations differ only in when the other jobs ran, not in how much.
    series = background_series(samples, cores)
    # Replay second 0 is the simulator's second 0 (the client's clock starts a few ms later).
    schedule = series.schedule(origin_s=wall0)
    return RealRun(ttft, warmup, day, cpu / max(tokens, 1), tokens, server, started,
                   series.mean_stretch, series.mean_threads, schedule, whole)  # fmt: skip


def ttft_sums(url: str) -> tuple[float, int]:
    """The runtime's TTFT histogram: (sum, count) over every model."""
    total, count = 0.0, 0
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("warmserve:time_to_first_token_seconds_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("warmserve:time_to_first_token_seconds_count"):
            count += int(float(line.rsplit(" ", 1)[1]))
    return total, count


def run_sim(cfg: ServeConfig, bench: BenchConfig, model_dir: Path, real: RealRun,
            args: argparse.Namespace, background: float = 0.0,
            schedule: tuple[tuple[float, float], ...] = ()) -> np.ndarray:  # fmt: skip
    """Simulated TTFT per request, with `background` other-job threads on the host (or, with
    a `schedule`, that series of them, `background` before it starts)."""
    wl_real = build_workload(bench)
    exp = serve_experiment(
        cfg, args.profile, dict.fromkeys(MODELS, model_dir), slo_ttft_s=bench.slo_ttft_s,
        slo_tpot_s=bench.slo_tpot_s, warmup_s=real.warmup_s, drain_s=bench.request_timeout_s,
        duration_s=bench.duration_s / bench.time_scale,
    )  # fmt: skip
    assert exp.profile is not None and exp.profile.shared_host
    host = dataclasses.replace(exp.profile.host, background_threads=background,
                               background_schedule=schedule)  # fmt: skip
    if args.gateway_s_per_token is not None:
        host = dataclasses.replace(host, gateway_s_per_token=args.gateway_s_per_token)
    exp = dataclasses.replace(exp, profile=dataclasses.replace(exp.profile, host=host))
    wl = replay_workload(cfg, wl_real.arrival_s / bench.time_scale, wl_real.model_idx,
                         wl_real.input_tokens, wl_real.output_tokens, real.start_of_day_s,
                         wl_real.model_names)  # fmt: skip
    res = run_policy(exp, cfg.policy, wl)
    s = res.summary
    what = f"{len(schedule)}-interval series" if schedule else f"{background:.2f} threads"
    print(f"  simulated (background {what}) starts: {s['cold_starts']} cold, "
          f"{s['prewarm_hits']} prewarm hits, {s['inprogress_hits']} in-progress hits")  # fmt: skip
    return res.log.first_token_s - res.log.arrival_s


def sim_only(rate: float, bench: BenchConfig, model_dir: Path, args: argparse.Namespace,
             tmp: Path) -> None:  # fmt: skip
    """The simulator alone, as if a real run had started now after `--settle-s`."""
    hist = tmp / f"history-{rate}.csv"
    history_csv(hist, bench, args.time_scale)
    cfg = serve_config(model_dir, hist, args, 1)
    now = RealRun(np.zeros(0), args.settle_s, seconds_into_day(), 0.0, 0, float("nan"), {})
    sim = run_sim(cfg, bench, model_dir, now, args, args.background_threads or 0.0)
    p50, p90, p99 = (pct(sim, q) for q in PCTS)
    failed = int(np.isnan(sim).sum())
    print(f"rate {rate:4.2f}/s simulated ({len(sim)} requests): TTFT p50 {p50:.3f} s p90 "
          f"{p90:.3f} s p99 {p99:.3f} s, failed {failed}", flush=True)  # fmt: skip


# A request that got no first token (the client's timeout, or unfinished when the simulator's
# drain ended) counts at the timeout, as `warmserve bench` charges it: dropping it would make
# a struggling server's percentiles look better.
FAILED_TTFT_S = 120.0


def pct(x: np.ndarray, q: float) -> float | None:
    return float(np.percentile(np.nan_to_num(x, nan=FAILED_TTFT_S), q)) if len(x) else None


def rel(sim: float | None, real: float | None) -> float | None:
    return None if sim is None or not real else (sim - real) / real


def row(rate: float, saturated: bool, runs: list[RealRun], sim: np.ndarray,
        background: float, dedicated: np.ndarray,
        series: list[np.ndarray] | None = None,
        own: list[np.ndarray] | None = None) -> dict[str, Any]:  # fmt: skip
    pooled = np.concatenate([r.ttft_s for r in runs])
    out: dict[str, Any] = {"rate_rps": rate, "saturated": saturated, "repeats": len(runs),
                           "requests": len(sim),
                           "real_failed": int(sum(np.isnan(r.ttft_s).sum() for r in runs)),
                           "sim_failed": int(np.isnan(sim).sum())}  # fmt: skip
    for q in PCTS:
        real_q, sim_q = pct(pooled, q), pct(sim, q)
        each = [pct(r.ttft_s, q) for r in runs]
        out[f"real_ttft_p{q}_s"] = real_q
        out[f"sim_ttft_p{q}_s"] = sim_q
        out[f"rel_error_p{q}"] = rel(sim_q, real_q)
        out[f"real_p{q}_spread_s"] = [min(each), max(each)] if each else None
        # The spread as a relative error: how far the repeats stray from the pooled figure.
        out[f"real_p{q}_spread_rel"] = (
            max(abs(e - real_q) for e in each) / real_q if each and real_q else None
        )
    out["gateway_cpu_s_per_token"] = float(np.median([r.gateway_cpu_s_per_token for r in runs]))
    # Where real time goes: the client's mean TTFT less the runtime's own (submit to first
    # token) is the gateway, HTTP and client share, which the simulator charges as CPU only.
    out["real_ttft_mean_s"] = float(np.nanmean(pooled))
    out["real_server_ttft_mean_s"] = float(np.nanmean([r.server_ttft_mean_s for r in runs]))
    out["sim_ttft_mean_s"] = float(np.nanmean(sim))
    out["real_starts"] = [r.starts for r in runs]
    # The host's other jobs: as measured in each run, and what the simulation used; beside
    # it the simulator's prediction for a dedicated host (no other jobs).
    out["real_worker_stretch"] = [None if np.isnan(r.worker_stretch) else r.worker_stretch
                                  for r in runs]  # fmt: skip
    out["real_background_threads"] = [
        None if np.isnan(r.background_threads) else r.background_threads for r in runs
    ]
    out["sim_background_threads"] = background
    for q in PCTS:
        out[f"sim_dedicated_ttft_p{q}_s"] = pct(dedicated, q)
    if series:
        # Each run simulated with its own other jobs as they came (its series), pooled as the
        # real runs are; beside it the same runs each with its own constant share.
        pooled_series = np.concatenate(series)
        pooled_own = np.concatenate(own) if own else None
        for q in PCTS:
            real_q, sim_q = pct(pooled, q), pct(pooled_series, q)
            out[f"sim_series_ttft_p{q}_s"] = sim_q
            out[f"rel_error_series_p{q}"] = rel(sim_q, real_q)
            if pooled_own is not None:
                const_q = pct(pooled_own, q)
                out[f"sim_own_constant_ttft_p{q}_s"] = const_q
                out[f"rel_error_own_constant_p{q}"] = rel(const_q, real_q)
    # Per request (NaN: failed), for a later look at where the two differ.
    out["real_ttft_s"] = [[None if np.isnan(x) else round(float(x), 4) for x in r.ttft_s]
                          for r in runs]  # fmt: skip
    out["sim_ttft_s"] = [None if np.isnan(x) else round(float(x), 4) for x in sim]
    return out


def per_run(run: RealRun, sim: np.ndarray, series: np.ndarray) -> dict[str, Any]:
    """One real run against the simulator given that run's own measured other jobs: their
    mean share as a constant (`sim_*`), and their series (`sim_series_*`)."""
    levels = [b for _, b in run.background_schedule]
    out: dict[str, Any] = {"background_threads": run.background_threads,
                           "background_threads_whole_run": run.background_threads_whole_run,
                           "background_series_intervals": len(levels),
                           "background_series_range": [min(levels), max(levels)] if levels
                           else None}  # fmt: skip
    for q in (50, 99):
        real_q = pct(run.ttft_s, q)
        out[f"real_ttft_p{q}_s"] = real_q
        out[f"sim_ttft_p{q}_s"] = pct(sim, q)
        out[f"sim_series_ttft_p{q}_s"] = pct(series, q)
        out[f"rel_error_p{q}"] = rel(pct(sim, q), real_q)
        out[f"rel_error_series_p{q}"] = rel(pct(series, q), real_q)
    out["background_schedule"] = [[round(t, 3), round(b, 3)] for t, b in run.background_schedule]
    return out


Curve = tuple[float, list[RealRun], np.ndarray, np.ndarray | None]  # rate, runs, sim, series


def plot(path: Path, curves: list[Curve]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4), squeeze=False)
    for ax, (rate, runs, sim, series) in zip(axes[0], curves, strict=True):
        for k, r in enumerate(runs):
            x = np.sort(r.ttft_s[~np.isnan(r.ttft_s)])
            ax.step(x, np.arange(1, len(x) + 1) / len(r.ttft_s), where="post", color="C0",
                    alpha=0.35, label="real, each run" if k == 0 else None)  # fmt: skip
        pooled = np.concatenate([r.ttft_s for r in runs])
        lines = [(pooled, "real, pooled", "C0"), (sim, "simulated", "C1")]
        if series is not None:
            lines.append((series, "simulated, each run's series of other jobs", "C2"))
        for y, label, style in lines:
            x, n = np.sort(y[~np.isnan(y)]), len(y)
            ax.step(x, np.arange(1, len(x) + 1) / n, where="post", color=style, lw=2, label=label)
        ax.set_xscale("log")
        ax.set_xlabel("TTFT (s)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{rate} req/s")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rates", default="0.2,0.4", help="offered req/s (real time) below saturation")
    p.add_argument("--saturated-rates", default="0.8", help="offered req/s at saturation")
    p.add_argument("--repeats", type=int, default=5, help="real runs per rate")
    p.add_argument("--duration", type=float, default=1800.0, help="trace seconds replayed")
    p.add_argument("--time-scale", type=float, default=10.0)
    p.add_argument("--start-hour", type=float, default=9.0, help="Azure trace hour (a ramp)")
    p.add_argument("--profile", default="cpu-2core-shared", help="device profile: name or path")
    p.add_argument("--gateway-s-per-token", type=float, default=None,
                   help="override the profile's host.gateway_s_per_token")  # fmt: skip
    p.add_argument("--background-threads", type=float, default=None,
                   help="the host's other jobs, in serve-worker threads (the profile's "
                        "host.background_threads); default: as measured in the real runs "
                        "(0 with --sim-only)")  # fmt: skip
    p.add_argument(
        "--sample-s",
        type=float,
        default=1.0,
        help="seconds between samples of the workers' schedstat (the series)",
    )
    p.add_argument("--policy", default="warmserve")
    p.add_argument("--pool-mib", type=int, default=1536)
    p.add_argument("--capacity", type=int, default=4, help="capacity_per_instance")
    p.add_argument("--settle-s", type=float, default=5.0)
    p.add_argument("--max-input-tokens", type=int, default=128)
    p.add_argument("--max-output-tokens", type=int, default=16)
    p.add_argument("--slo-ttft", type=float, default=2.0)
    p.add_argument("--quick", action="store_true", help="one rate below saturation, 2 repeats")
    p.add_argument(
        "--sim-only", action="store_true", help="no real server: the simulated percentiles only"
    )
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path, default=Path("results/bench/fidelity_cdf.png"))
    args = p.parse_args()
    if args.quick:
        args.rates, args.saturated_rates, args.repeats, args.duration = "0.3", "", 2, 2400.0
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    plan = [(float(r), False) for r in args.rates.split(",") if r] + [
        (float(r), True) for r in args.saturated_rates.split(",") if r
    ]
    model_dir = prepare_smollm2(dtype="float32")
    rows, curves = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for rate, saturated in plan:
            bench = BenchConfig(
                endpoint="http://127.0.0.1:1", trace="azure-conv", models=MODELS,
                rps=rate / args.time_scale, time_scale=args.time_scale,
                duration_s=args.duration, start_hour=args.start_hour,
                max_input_tokens=args.max_input_tokens,
                max_output_tokens=args.max_output_tokens, request_timeout_s=FAILED_TTFT_S,
                slo_ttft_s=args.slo_ttft, slo_tpot_s=1.0,
            )  # fmt: skip
            if args.sim_only:
                sim_only(rate, bench, model_dir, args, Path(tmp))
                continue
            runs = []
            for k in range(args.repeats):
                hist = Path(tmp) / f"history-{rate}-{k}.csv"
                history_csv(hist, bench, args.time_scale)
                cfg = serve_config(model_dir, hist, args, free_port())
                runs.append(run_real(cfg, bench, args.settle_s, args.sample_s))
                r = runs[-1]
                print(f"rate {rate:4.2f}/s real run {k + 1}/{args.repeats}: TTFT p50 "
                      f"{pct(r.ttft_s, 50):.3f} s p99 {pct(r.ttft_s, 99):.3f} s, failed "
                      f"{int(np.isnan(r.ttft_s).sum())}, mean {np.nanmean(r.ttft_s):.3f} s "
                      f"(runtime's own {r.server_ttft_mean_s:.3f} s), gateway CPU "
                      f"{r.gateway_cpu_s_per_token * 1e3:.2f} ms/token, starts {r.starts}, "
                      f"worker stretch {r.worker_stretch:.2f} (other jobs "
                      f"{r.background_threads:.2f} threads)",
                      flush=True)  # fmt: skip
            # The simulator sees the first run's history and start time; the others differ
            # from it by the seconds between runs, well inside a forecast window.
            hist = Path(tmp) / f"history-{rate}-0.csv"
            cfg = serve_config(model_dir, hist, args, 1)
            measured = [r.background_threads for r in runs if not np.isnan(r.background_threads)]
            bg = (args.background_threads if args.background_threads is not None
                  else float(np.median(measured)) if measured else 0.0)  # fmt: skip
            sim = run_sim(cfg, bench, model_dir, runs[0], args, bg)
            dedicated = run_sim(cfg, bench, model_dir, runs[0], args, 0.0) if bg else sim
            per, series, own = [], [], []
            if args.background_threads is None:
                # Runs that met different loads: each against the simulator with its own, as
                # a constant share and as the series it met.
                for r in runs:
                    if np.isnan(r.background_threads):
                        continue
                    own.append(run_sim(cfg, bench, model_dir, r, args, r.background_threads)
                               if len(runs) > 1 else sim)  # fmt: skip
                    series.append(run_sim(cfg, bench, model_dir, r, args, r.background_threads,
                                          r.background_schedule))  # fmt: skip
                    per.append(per_run(r, own[-1], series[-1]))
            rows.append(row(rate, saturated, runs, sim, bg, dedicated,
                            *((series, own) if len(series) == len(runs) else ())))  # fmt: skip
            if per:
                rows[-1]["per_run"] = per
                for k, pr in enumerate(per):
                    lo, hi = pr["background_series_range"] or (float("nan"), float("nan"))
                    print(f"  run {k + 1} (other jobs {pr['background_threads']:.2f} threads, "
                          f"{lo:.2f}-{hi:.2f} over {pr['background_series_intervals']} "
                          f"intervals): real p50 {pr['real_ttft_p50_s']:.3f} s p99 "
                          f"{pr['real_ttft_p99_s']:.3f} s; simulated, constant p50 "
                          f"{pr['sim_ttft_p50_s']:.3f} s p99 {pr['sim_ttft_p99_s']:.3f} s, "
                          f"series p50 {pr['sim_series_ttft_p50_s']:.3f} s p99 "
                          f"{pr['sim_series_ttft_p99_s']:.3f} s", flush=True)  # fmt: skip
            curves.append((rate, runs, sim,
                           np.concatenate(series) if series and len(series) == len(runs)
                           else None))  # fmt: skip
            s = rows[-1]
            print(f"rate {rate:4.2f}/s simulated: TTFT p50 {s['sim_ttft_p50_s']:.3f} s p99 "
                  f"{s['sim_ttft_p99_s']:.3f} s mean {s['sim_ttft_mean_s']:.3f} s; on a "
                  f"dedicated host p50 {s['sim_dedicated_ttft_p50_s']:.3f} s p99 "
                  f"{s['sim_dedicated_ttft_p99_s']:.3f} s", flush=True)  # fmt: skip
    if args.sim_only:
        return
    print()
    print(f"{'rate':>5s} {'sat':>4s} {'real p50':>9s} {'sim p50':>8s} {'err':>6s} {'spread':>7s} "
          f"{'real p90':>9s} {'sim p90':>8s} {'err':>6s} {'real p99':>9s} {'sim p99':>8s} "
          f"{'err':>6s} {'spread':>7s}")  # fmt: skip

    def f(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    for r in rows:
        print(
            f"{r['rate_rps']:5.2f} {'yes' if r['saturated'] else 'no':>4s} "
            f"{f(r['real_ttft_p50_s'], '.3f'):>9s} {f(r['sim_ttft_p50_s'], '.3f'):>8s} "
            f"{f(r['rel_error_p50'], '+.0%'):>6s} {f(r['real_p50_spread_rel'], '.0%'):>7s} "
            f"{f(r['real_ttft_p90_s'], '.3f'):>9s} {f(r['sim_ttft_p90_s'], '.3f'):>8s} "
            f"{f(r['rel_error_p90'], '+.0%'):>6s} "
            f"{f(r['real_ttft_p99_s'], '.3f'):>9s} {f(r['sim_ttft_p99_s'], '.3f'):>8s} "
            f"{f(r['rel_error_p99'], '+.0%'):>6s} {f(r['real_p99_spread_rel'], '.0%'):>7s}"
        )
    if any("sim_series_ttft_p50_s" in r for r in rows):
        print(
            "\nEach run simulated with its own other jobs, pooled: as they came (series) and"
            " as the run's mean share (const)"
        )
        print(f"{'rate':>5s} {'real p50':>9s} {'series':>8s} {'err':>6s} {'const':>6s} "
              f"{'real p99':>9s} {'series':>8s} {'err':>6s} {'const':>6s}")  # fmt: skip
        for r in rows:
            if "sim_series_ttft_p50_s" not in r:
                continue
            print(
                f"{r['rate_rps']:5.2f} {f(r['real_ttft_p50_s'], '.3f'):>9s} "
                f"{f(r['sim_series_ttft_p50_s'], '.3f'):>8s} "
                f"{f(r['rel_error_series_p50'], '+.0%'):>6s} "
                f"{f(r.get('rel_error_own_constant_p50'), '+.0%'):>6s} "
                f"{f(r['real_ttft_p99_s'], '.3f'):>9s} {f(r['sim_series_ttft_p99_s'], '.3f'):>8s} "
                f"{f(r['rel_error_series_p99'], '+.0%'):>6s} "
                f"{f(r.get('rel_error_own_constant_p99'), '+.0%'):>6s}"
            )
    plot(args.plot, curves)
    print(f"CDFs: {args.plot}")
    write_json(args.json, {"trace": "azure-conv", "models": MODELS, "profile": args.profile,
                           "policy": args.policy, "time_scale": args.time_scale,
                           "duration_s": args.duration, "start_hour": args.start_hour,
                           "repeats": args.repeats, "results": rows})  # fmt: skip


if __name__ == "__main__":
    main()
