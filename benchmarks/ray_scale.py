"""The Ray actor hop's cost: the same workload on local worker processes and on Ray actors.

Starts the real server twice on this machine (SmolLM2 fp32, two CPU workers, the same serve
settings), once per runtime, and sends the same closed-loop load to each: `--clients`
concurrent clients, each sending `--requests` short completions one after another. Reports
request throughput, TTFT P50/P99 and the server start time per runtime, and the Ray ÷ local
ratios, as a table and JSON.

    python benchmarks/ray_scale.py [--clients 4] [--requests 6] [--json OUT.json]

With `--tp`, tensor parallelism on CPU instead: what building a node's TP groups costs (2 and
4 ranks, gloo), and on the local runtime with two workers serving the same SmolLM2 at TP 1 and
at TP 2, one model at a time (each start waits for the last instance to scale down): the
activation latency of a prewarmed replica (the workers' own, `warmserve:activation_seconds`,
zero copy) and the decode step time (the median gap between streamed tokens of one request).

    python benchmarks/ray_scale.py --tp [--rounds 3] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one(url: str, model: str, ttfts: list[float], lock: threading.Lock) -> None:
    body = {"model": model, "prompt": "Tell me about the sea.", "max_tokens": 16,
            "stream": True, "ignore_eos": True, "temperature": 0}  # fmt: skip
    t0 = time.perf_counter()
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        first = None
        for line in r.iter_lines():
            if first is None and line.startswith("data: {"):
                first = time.perf_counter() - t0
    with lock:
        ttfts.append(first if first is not None else float("nan"))


def run_one(kind: str, clients: int, requests: int) -> dict:
    from warmserve.models import prepare_smollm2
    from warmserve.serve_config import parse_serve_config
    from warmserve.server import BackgroundServer

    smol = prepare_smollm2(dtype="float32")
    raw = {
        "listen": {"port": _free_port()},
        "workers": {"count": 2, "pool_mib": 1536, "threads": 1},
        "models": [
            {"name": "a", "path": str(smol), "max_model_len": 1024},
            {"name": "b", "path": str(smol), "max_model_len": 1024},
        ],
        "control": {"capacity_per_instance": 8},
        "runtime": {"kind": kind},
    }
    cfg = parse_serve_config(raw, Path(tempfile.mkdtemp()))
    t0 = time.perf_counter()
    with BackgroundServer(cfg) as srv:
        start_s = time.perf_counter() - t0
        for m in ("a", "b"):  # both instances up before timing
            warm = {"model": m, "prompt": "hi", "max_tokens": 2}
            httpx.post(srv.url + "/v1/completions", json=warm, timeout=300)
        ttfts: list[float] = []
        lock = threading.Lock()

        def client(k: int) -> None:
            for _ in range(requests):
                _one(srv.url, "ab"[k % 2], ttfts, lock)

        t1 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        wall = time.perf_counter() - t1
    ttfts.sort()
    return {
        "runtime": kind,
        "requests": len(ttfts),
        "throughput_rps": round(len(ttfts) / wall, 3),
        "ttft_p50_s": round(statistics.median(ttfts), 4),
        "ttft_p99_s": round(ttfts[int(0.99 * (len(ttfts) - 1))], 4),
        "server_start_s": round(start_s, 2),
    }


def _median(runs: list[dict]) -> dict:
    """Each figure's median over the runs of one runtime."""
    keys = ("throughput_rps", "ttft_p50_s", "ttft_p99_s", "server_start_s")
    out = {**runs[0], **{k: statistics.median(r[k] for r in runs) for k in keys}}
    return out


def _build_rank(spec, out) -> None:
    from warmserve.runtime.groups import build_groups

    ng = build_groups(spec)
    out.put(ng.build_s)
    ng.close()


def group_build_cost(size: int) -> dict:
    """Every rank's time to join a world of `size` and build its aligned groups."""
    import multiprocessing as mp

    from warmserve.runtime.groups import GroupSpec, aligned_groups

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    store = Path(tempfile.mkdtemp()) / "store"
    procs = [
        ctx.Process(target=_build_rank, args=(GroupSpec(str(store), r, size, size, 60.0), out))
        for r in range(size)
    ]
    for p in procs:
        p.start()
    times = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
    return {
        "ranks": size,
        "groups": len(aligned_groups(size, size)),
        "build_s_max": round(max(times), 4),
        "build_s_median": round(statistics.median(times), 4),
    }


def _metric(url: str, name: str, model: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(f'{name}{{model_name="{model}"}}'):
            return float(line.rpartition(" ")[2])
    return 0.0


def _wait_idle(url: str, timeout_s: float = 120.0) -> None:
    """Until no instance runs (the last one was released after its idle period)."""
    deadline = time.perf_counter() + timeout_s
    while httpx.get(url + "/admin/cluster", timeout=30).json()["instances"]:
        if time.perf_counter() > deadline:
            raise TimeoutError("instances did not scale down")
        time.sleep(0.2)


def _starts(url: str) -> dict[str, float]:
    """Instance starts so far, by model and path."""
    out = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("warmserve:instance_starts_total{"):
            key, _, value = line.rpartition(" ")
            out[key.split("{", 1)[1].rstrip("}")] = float(value)
    return out


def _stream_gaps(url: str, model: str, tokens: int) -> tuple[float, list[float]]:
    """One greedy streamed completion: its TTFT and the gaps between later tokens."""
    body = {
        "model": model,
        "prompt": "Tell me about the sea.",
        "max_tokens": tokens,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0,
    }
    t0 = time.perf_counter()
    arrivals = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.perf_counter())
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return arrivals[0] - t0, gaps


def run_tp(rounds: int, tokens: int) -> dict:
    from warmserve.models import prepare_smollm2
    from warmserve.serve_config import parse_serve_config
    from warmserve.server import BackgroundServer

    builds = [group_build_cost(2), group_build_cost(4)]
    smol = prepare_smollm2(dtype="float32")
    models = {"tp1": 1, "tp2": 2}
    raw = {
        "listen": {"port": _free_port()},
        "workers": {"count": 2, "pool_mib": 1536, "threads": 1},
        "models": [
            {"name": n, "path": str(smol), "max_model_len": 1024, "tp": tp}
            for n, tp in models.items()
        ],
        "control": {
            "capacity_per_instance": 8,
            "scale_window_s": 1.0,
            "protect_period_s": 1.0,
            "tick_s": 0.1,
        },
    }
    cfg = parse_serve_config(raw, Path(tempfile.mkdtemp()))
    acts: dict[str, list[float]] = {n: [] for n in models}  # prewarm hits
    colds: dict[str, list[float]] = {n: [] for n in models}
    steps: dict[str, list[float]] = {n: [] for n in models}
    with BackgroundServer(cfg) as srv:
        view = httpx.get(srv.url + "/admin/cluster", timeout=30).json()
        server_builds = [w["tp_groups_build_s"] for w in view["workers"]]
        for n in models:
            # The first start of a model is cold; once its idle instance is released its
            # weights stay prewarmed on the same workers, and the next start is a hit (zero
            # copy). Alternating the models would evict each other's weights: on two workers
            # a TP 2 instance takes both.
            for _ in range(rounds):
                _wait_idle(srv.url)
                name = "warmserve:activation_seconds"
                s0, c0 = _metric(srv.url, name + "_sum", n), _metric(srv.url, name + "_count", n)
                before = _starts(srv.url)
                _, gaps = _stream_gaps(srv.url, n, tokens)
                s1, c1 = _metric(srv.url, name + "_sum", n), _metric(srv.url, name + "_count", n)
                after = _starts(srv.url)
                hit = any("hit" in k and after[k] > before.get(k, 0) for k in after)
                if c1 > c0:
                    (acts if hit else colds)[n].append((s1 - s0) / (c1 - c0))
                steps[n].append(statistics.median(gaps))
        paths = _starts(srv.url)
    rows = {
        n: {
            "tp": models[n],
            "activation_s_median": round(statistics.median(acts[n]), 4) if acts[n] else None,
            "activations": len(acts[n]),
            # A cold start's activation includes waiting for the slowest rank's load.
            "cold_activation_s": [round(a, 4) for a in colds[n]],
            "decode_step_s_median": round(statistics.median(steps[n]), 4),
        }
        for n in models
    }
    return {
        "group_build": builds,
        "server_group_build_s": server_builds,
        "models": rows,
        "starts": paths,
        "rounds": rounds,
        "tokens": tokens,
        "ratios": {
            "activation_tp2_over_tp1": _ratio(rows, "activation_s_median"),
            "decode_step_tp2_over_tp1": _ratio(rows, "decode_step_s_median"),
        },
    }


def _ratio(rows: dict, key: str) -> float | None:
    a, b = rows["tp2"][key], rows["tp1"][key]
    return round(a / b, 3) if a and b else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", action="store_true", help="the tensor-parallel figures instead")
    ap.add_argument("--rounds", type=int, default=3, help="--tp: starts of each model")
    ap.add_argument("--tokens", type=int, default=48, help="--tp: tokens per request")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=6, help="per client")
    ap.add_argument("--repeat", type=int, default=2, help="alternating runs of each runtime")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.tp:
        doc = run_tp(args.rounds, args.tokens)
        for b in doc["group_build"]:
            mx, md = b["build_s_max"] * 1000, b["build_s_median"] * 1000
            print(
                f"group build, {b['ranks']} ranks ({b['groups']} groups): "
                f"max {mx:.0f} ms, median {md:.0f} ms"
            )
        print("in the server:", doc["server_group_build_s"])
        for n, r in doc["models"].items():
            act = r["activation_s_median"]
            act_ms = act * 1000 if act else float("nan")
            step_ms = r["decode_step_s_median"] * 1000
            print(
                f"{n}: activation {act_ms:.1f} ms ({r['activations']} starts), "
                f"decode step {step_ms:.1f} ms"
            )
        print("starts:", doc["starts"])
        print("tp2 ÷ tp1:", doc["ratios"])
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(doc, indent=2) + "\n")
        return
    runs: dict[str, list[dict]] = {"local": [], "ray": []}
    for _ in range(args.repeat):  # alternating, so drifting background load hits both
        for kind in runs:
            runs[kind].append(run_one(kind, args.clients, args.requests))
    rows = [_median(v) for v in runs.values()]
    for r in rows:
        print(f"{r['runtime']:>6}: {r['requests']} requests, {r['throughput_rps']:.2f} req/s, "
              f"TTFT P50 {r['ttft_p50_s'] * 1000:.0f} ms, P99 {r['ttft_p99_s'] * 1000:.0f} ms, "
              f"server start {r['server_start_s']:.1f} s")  # fmt: skip
    local, ray_ = rows
    ratios = {
        "throughput_ray_over_local": round(ray_["throughput_rps"] / local["throughput_rps"], 3),
        "ttft_p50_ray_over_local": round(ray_["ttft_p50_s"] / local["ttft_p50_s"], 3),
        "ttft_p99_ray_over_local": round(ray_["ttft_p99_s"] / local["ttft_p99_s"], 3),
    }
    print("ray ÷ local:", ratios)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {"clients": args.clients, "requests_per_client": args.requests,
               "repeat": args.repeat, "rows": rows, "runs": runs, "ratios": ratios}  # fmt: skip
        args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
