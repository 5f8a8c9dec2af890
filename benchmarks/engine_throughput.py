"""Decode throughput of the paged engine vs transformers `generate`, SmolLM2-135M on CPU.

For each concurrency (1, 8, 32) and dtype (fp32, bf16), `concurrency` chat prompts generate
`--tokens` tokens each (greedy, no early stop), once with WarmServe's engine as a worker serves
it (weights loaded into a pool slot, activated, continuous batching over paged KV in the pool)
and once with transformers `generate` on the same prompts (left-padded batch), in the same
process. Reports generated tokens per second of wall time; `--repeat` runs alternate the two
and keep each one's best, since these machines are noisy.

The roofline: a decode step reads every weight once, so `concurrency` sequences decode at most
`concurrency × read bandwidth / weight bytes` tokens/s. The script measures the machine's read
bandwidth itself (a sum over a 1 GiB buffer on the same threads, best of 3, again before each
concurrency: a shared machine's bandwidth moves) and reports both engines' fraction of that
bound. `--threads` sets torch's threads (default 1: one thread per
worker process, as `serve` runs on a CPU host with as many workers as cores).

    python benchmarks/engine_throughput.py --json results/bench/engine_throughput.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from bench_output import write_json
from transformers import AutoModelForCausalLM, AutoTokenizer

from warmserve.engine.engine import Engine
from warmserve.engine.request import SamplingParams
from warmserve.models import prepare_smollm2
from warmserve.worker.layout import checkpoint_files, weight_pages, weights_layout
from warmserve.worker.pages import CpuPages
from warmserve.worker.pool import PagePool
from warmserve.worker.worker import UniversalWorker

QUESTIONS = [
    "What is the capital of France?", "Name three primary colours.", "Explain gravity briefly.",
    "Write a haiku about the sea.", "What is 17 times 3?", "Who wrote Hamlet?",
    "Give a synonym for happy.", "What does a CPU do?",
]  # fmt: skip


def prompts(tok, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
        out.append(tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False))
    return out


def serving_engine(model_dir: Path, kv_mib: int = 256) -> tuple[UniversalWorker, Engine]:
    """A worker with the model prewarmed into its pool and activated (KV over the rest)."""
    weights = weight_pages(model_dir, 2 << 20)
    worker = UniversalWorker(PagePool(CpuPages(weights + kv_mib // 2)))
    worker.prewarm("m", model_dir)
    return worker, worker.activate("m")


def ours(engine: Engine, ids: list[list[int]], tokens: int) -> float:
    t0 = time.perf_counter()
    out = engine.generate(ids, SamplingParams(max_tokens=tokens, ignore_eos=True))
    wall = time.perf_counter() - t0
    assert all(len(o) == tokens for o in out)
    return len(ids) * tokens / wall


def transformers_generate(model, tok, ids: list[list[int]], tokens: int) -> float:
    width = max(map(len, ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batch = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(batch, attention_mask=mask, max_new_tokens=tokens,
                             min_new_tokens=tokens, do_sample=False, pad_token_id=pad)  # fmt: skip
    wall = time.perf_counter() - t0
    assert out.shape[1] - width == tokens
    return len(ids) * tokens / wall


def read_bandwidth(gib: float = 1.0, repeat: int = 3) -> float:
    """Bytes per second a reduction streams from memory on torch's current threads."""
    buf = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return buf.nbytes / best


def weight_bytes(model_dir: Path) -> int:
    return sum(t.nbytes for t in weights_layout(checkpoint_files(model_dir))[0])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--repeat", type=int, default=2, help="alternating runs of each; best kept")
    ap.add_argument("--dtypes", default="fp32,bf16", help="fp32 and/or bf16")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}")
    tok = AutoTokenizer.from_pretrained(prepare_smollm2())
    rows = []
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    for dtype_name in args.dtypes.split(","):
        dtype = dtypes[dtype_name]
        model_dir = prepare_smollm2(dtype="float32" if dtype == torch.float32 else "bfloat16")
        weights = weight_bytes(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        worker, engine = serving_engine(model_dir)
        for c in (int(x) for x in args.concurrency.split(",")):
            ids = prompts(tok, c)
            ours(engine, ids[:1], 2)  # warm-up
            w = t = 0.0
            for _ in range(args.repeat):
                w = max(w, ours(engine, ids, args.tokens))
                t = max(t, transformers_generate(model, tok, ids, args.tokens))
            bandwidth = read_bandwidth()
            roof = c * bandwidth / weights  # every weight read once a step
            row = {"concurrency": c, "dtype": dtype_name, "warmserve_tok_s": round(w, 1),
                   "transformers_tok_s": round(t, 1), "ratio": round(w / t, 2),
                   "weight_bytes": weights, "read_gb_s": round(bandwidth / 1e9, 1),
                   "roofline_tok_s": round(roof, 1),
                   "warmserve_roofline": round(w / roof, 3),
                   "transformers_roofline": round(t / roof, 3)}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
        worker.close()
        worker.pool.close()
    write_json(args.json, {"benchmark": "engine_throughput", "model": "SmolLM2-135M-Instruct",
                           "tokens_per_request": args.tokens, "repeat": args.repeat,
                           "threads": torch.get_num_threads(),
                           "results": rows})  # fmt: skip


if __name__ == "__main__":
    main()
