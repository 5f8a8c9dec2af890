"""Does one request stall everyone else? `/health` latency while hostile requests arrive.

Runs the real server (SmolLM2's tokenizer, a tiny random model so that generation is cheap)
on loopback and probes `/health` every 20 ms while, in turn: nothing else happens (idle);
clients send 1 MB prompts; clients send requests with 90,000 stop strings; 16 ordinary
streams run. Any CPU work done on the event loop for a request (tokenising, stop-string
matching, chat templating) shows up as probe latency. Prints a table and writes JSON.

    python benchmarks/loop_latency.py [--seconds 8] [--json results/bench/loop_latency.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx


def _tiny_model(out: Path, tokenizer_dir: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(url: str, kind: str, stop: threading.Event, counts: dict[str, int]) -> None:
    big = "lorem ipsum " * 83_000  # ~1 MB
    stops = [f"s{k}" for k in range(90_000)]
    with httpx.Client(timeout=120) as c:
        while not stop.is_set():
            if kind == "1MB prompt":
                body = {"model": "tiny", "prompt": big, "max_tokens": 1}
            elif kind == "90k stop strings":
                body = {"model": "tiny", "prompt": "count", "max_tokens": 32, "stop": stops,
                        "ignore_eos": True}  # fmt: skip
            else:
                body = {"model": "tiny", "prompt": "count", "max_tokens": 64, "ignore_eos": True,
                        "stream": True}  # fmt: skip
            try:
                r = c.post(url + "/v1/completions", json=body)
                key = f"status_{r.status_code}"
            except httpx.HTTPError as e:
                key = type(e).__name__
            counts[key] = counts.get(key, 0) + 1


def _probe(url: str, seconds: float) -> list[float]:
    lat = []
    end = time.perf_counter() + seconds
    with httpx.Client(timeout=30) as c:
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            c.get(url + "/health")
            lat.append(time.perf_counter() - t0)
            time.sleep(0.02)
    return lat


def run(seconds: float) -> list[dict]:
    from warmserve.models import prepare_smollm2
    from warmserve.serve_config import parse_serve_config
    from warmserve.server import BackgroundServer

    tok_dir = prepare_smollm2(dtype="float32")
    tmp = Path(tempfile.mkdtemp())
    tiny = _tiny_model(tmp / "tiny", tok_dir)
    raw = {
        "listen": {"port": _free_port()},
        "workers": {"count": 1, "pool_mib": 128, "threads": 1},
        "models": [{"name": "tiny", "path": str(tiny)}],
        "control": {"capacity_per_instance": 32},
        "limits": {"max_request_bytes": 4 << 20},
    }
    cfg = parse_serve_config(raw, tmp)
    rows = []
    with BackgroundServer(cfg) as srv:
        httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": "warm up",
                                                      "max_tokens": 2}, timeout=120)  # fmt: skip
        for kind, clients in (("idle", 0), ("1MB prompt", 2), ("90k stop strings", 2),
                              ("16 streams", 16)):  # fmt: skip
            stop, counts = threading.Event(), {}
            threads = [threading.Thread(target=_load, args=(srv.url, kind, stop, counts))
                       for _ in range(clients)]  # fmt: skip
            for t in threads:
                t.start()
            time.sleep(0.5 if clients else 0)
            lat = _probe(srv.url, seconds)
            stop.set()
            for t in threads:
                t.join(180)
            lat.sort()
            row = {
                "case": kind,
                "probes": len(lat),
                "health_p50_ms": round(1000 * statistics.median(lat), 1),
                "health_p99_ms": round(1000 * lat[int(0.99 * (len(lat) - 1))], 1),
                "health_max_ms": round(1000 * lat[-1], 1),
                "load_requests": counts,
            }
            rows.append(row)
            print(f"{kind:>18}: /health P50 {row['health_p50_ms']:7.1f} ms  P99 "
                  f"{row['health_p99_ms']:7.1f} ms  max {row['health_max_ms']:7.1f} ms  "
                  f"({row['probes']} probes; load {counts})", flush=True)  # fmt: skip
    shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="probing time per case")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = run(args.seconds)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"seconds_per_case": args.seconds, "rows": rows},
                                        indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
