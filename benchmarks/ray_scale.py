"""The Ray actor hop's cost: the same workload on local worker processes and on Ray actors.

Starts the real server twice on this machine (SmolLM2 fp32, two CPU workers, the same serve
settings), once per runtime, and sends the same closed-loop load to each: `--clients`
concurrent clients, each sending `--requests` short completions one after another. Reports
request throughput, TTFT P50/P99 and the server start time per runtime, and the Ray ÷ local
ratios, as a table and JSON.

    python benchmarks/ray_scale.py [--clients 4] [--requests 6] [--json OUT.json]
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=6, help="per client")
    ap.add_argument("--repeat", type=int, default=2, help="alternating runs of each runtime")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
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
