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
too, as the number a CPU profile's `host.gateway_s_per_token` should hold.

    python benchmarks/fidelity.py --json results/bench/fidelity.json   # ~60 min
    python benchmarks/fidelity.py --quick                               # ~10 min: 1 rate, 2 runs
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from bench_output import write_json
from serve_burst import MODELS, free_port, history_csv, starts

from warmserve.bench import BenchConfig, build_workload, check_endpoint, replay
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


def run_real(cfg: ServeConfig, bench: BenchConfig, settle_s: float) -> RealRun:
    with BackgroundServer(cfg) as srv:
        up = time.perf_counter()
        time.sleep(settle_s)  # the planner prewarms from the seeded forecast
        b = dataclasses.replace(bench, endpoint=srv.url)
        check_endpoint(b)
        wl = build_workload(b)
        day = seconds_into_day()
        warmup = time.perf_counter() - up
        before, starts0 = ttft_sums(srv.url), starts(srv.url)
        cpu0 = time.process_time()
        results = asyncio.run(replay(b, wl, quiet=True))
        cpu = time.process_time() - cpu0
        after, starts1 = ttft_sums(srv.url), starts(srv.url)
    ttft = np.array([r.first_s if r.error is None else np.nan for r in results])
    tokens = sum(r.tokens for r in results if r.error is None)
    n = after[1] - before[1]
    server = (after[0] - before[0]) / n if n else float("nan")
    started = {k: v - starts0.get(k, 0) for k, v in starts1.items()}
    return RealRun(ttft, warmup, day, cpu / max(tokens, 1), tokens, server, started)


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
            args: argparse.Namespace) -> np.ndarray:  # fmt: skip
    wl_real = build_workload(bench)
    exp = serve_experiment(
        cfg, args.profile, dict.fromkeys(MODELS, model_dir), slo_ttft_s=bench.slo_ttft_s,
        slo_tpot_s=bench.slo_tpot_s, warmup_s=real.warmup_s, drain_s=bench.request_timeout_s,
        duration_s=bench.duration_s / bench.time_scale,
    )  # fmt: skip
    if args.gateway_s_per_token is not None:
        assert exp.profile is not None and exp.profile.shared_host
        host = dataclasses.replace(exp.profile.host, gateway_s_per_token=args.gateway_s_per_token)
        exp = dataclasses.replace(exp, profile=dataclasses.replace(exp.profile, host=host))
    wl = replay_workload(cfg, wl_real.arrival_s / bench.time_scale, wl_real.model_idx,
                         wl_real.input_tokens, wl_real.output_tokens, real.start_of_day_s,
                         wl_real.model_names)  # fmt: skip
    res = run_policy(exp, cfg.policy, wl)
    s = res.summary
    print(f"  simulated starts: {s['cold_starts']} cold, {s['prewarm_hits']} prewarm hits, "
          f"{s['inprogress_hits']} in-progress hits")  # fmt: skip
    return res.log.first_token_s - res.log.arrival_s


def pct(x: np.ndarray, q: float) -> float | None:
    ok = x[~np.isnan(x)]
    return float(np.percentile(ok, q)) if len(ok) else None


def rel(sim: float | None, real: float | None) -> float | None:
    return None if sim is None or not real else (sim - real) / real


def row(rate: float, saturated: bool, runs: list[RealRun], sim: np.ndarray) -> dict[str, Any]:
    pooled = np.concatenate([r.ttft_s for r in runs])
    out: dict[str, Any] = {"rate_rps": rate, "saturated": saturated, "repeats": len(runs),
                           "requests": len(sim),
                           "real_failed": int(sum(np.isnan(r.ttft_s).sum() for r in runs)),
                           "sim_failed": int(np.isnan(sim).sum())}  # fmt: skip
    for q in PCTS:
        real_q, sim_q = pct(pooled, q), pct(sim, q)
        each = [pct(r.ttft_s, q) for r in runs]
        each = [e for e in each if e is not None]
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
    # Per request (NaN: failed), for a later look at where the two differ.
    out["real_ttft_s"] = [[None if np.isnan(x) else round(float(x), 4) for x in r.ttft_s]
                          for r in runs]  # fmt: skip
    out["sim_ttft_s"] = [None if np.isnan(x) else round(float(x), 4) for x in sim]
    return out


def plot(path: Path, curves: list[tuple[float, list[RealRun], np.ndarray]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4), squeeze=False)
    for ax, (rate, runs, sim) in zip(axes[0], curves, strict=True):
        for k, r in enumerate(runs):
            x = np.sort(r.ttft_s[~np.isnan(r.ttft_s)])
            ax.step(x, np.arange(1, len(x) + 1) / len(r.ttft_s), where="post", color="C0",
                    alpha=0.35, label="real, each run" if k == 0 else None)  # fmt: skip
        pooled = np.concatenate([r.ttft_s for r in runs])
        for x, n, label, style in (
            (np.sort(pooled[~np.isnan(pooled)]), len(pooled), "real, pooled", "C0"),
            (np.sort(sim[~np.isnan(sim)]), len(sim), "simulated", "C1"),
        ):
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
    p.add_argument("--policy", default="warmserve")
    p.add_argument("--pool-mib", type=int, default=1536)
    p.add_argument("--capacity", type=int, default=4, help="capacity_per_instance")
    p.add_argument("--settle-s", type=float, default=5.0)
    p.add_argument("--max-input-tokens", type=int, default=128)
    p.add_argument("--max-output-tokens", type=int, default=16)
    p.add_argument("--slo-ttft", type=float, default=2.0)
    p.add_argument("--quick", action="store_true", help="one rate below saturation, 2 repeats")
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
                max_output_tokens=args.max_output_tokens, request_timeout_s=120.0,
                slo_ttft_s=args.slo_ttft, slo_tpot_s=1.0,
            )  # fmt: skip
            runs = []
            for k in range(args.repeats):
                hist = Path(tmp) / f"history-{rate}-{k}.csv"
                history_csv(hist, bench, args.time_scale)
                cfg = serve_config(model_dir, hist, args, free_port())
                runs.append(run_real(cfg, bench, args.settle_s))
                r = runs[-1]
                print(f"rate {rate:4.2f}/s real run {k + 1}/{args.repeats}: TTFT p50 "
                      f"{pct(r.ttft_s, 50):.3f} s p99 {pct(r.ttft_s, 99):.3f} s, failed "
                      f"{int(np.isnan(r.ttft_s).sum())}, mean {np.nanmean(r.ttft_s):.3f} s "
                      f"(runtime's own {r.server_ttft_mean_s:.3f} s), gateway CPU "
                      f"{r.gateway_cpu_s_per_token * 1e3:.2f} ms/token, starts {r.starts}",
                      flush=True)  # fmt: skip
            # The simulator sees the first run's history and start time; the others differ
            # from it by the seconds between runs, well inside a forecast window.
            hist = Path(tmp) / f"history-{rate}-0.csv"
            cfg = serve_config(model_dir, hist, args, 1)
            sim = run_sim(cfg, bench, model_dir, runs[0], args)
            rows.append(row(rate, saturated, runs, sim))
            curves.append((rate, runs, sim))
            s = rows[-1]
            print(f"rate {rate:4.2f}/s simulated: TTFT p50 {s['sim_ttft_p50_s']:.3f} s p99 "
                  f"{s['sim_ttft_p99_s']:.3f} s mean {s['sim_ttft_mean_s']:.3f} s",
                  flush=True)  # fmt: skip
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
    plot(args.plot, curves)
    print(f"CDFs: {args.plot}")
    write_json(args.json, {"trace": "azure-conv", "models": MODELS, "profile": args.profile,
                           "policy": args.policy, "time_scale": args.time_scale,
                           "duration_s": args.duration, "start_hour": args.start_hour,
                           "repeats": args.repeats, "results": rows})  # fmt: skip


if __name__ == "__main__":
    main()
