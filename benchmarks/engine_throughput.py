"""Decode throughput of the paged engine vs transformers `generate`, SmolLM2-135M on CPU.

For each concurrency (1, 8, 32) and dtype (fp32, bf16), `concurrency` chat prompts generate
`--tokens` tokens each (greedy, no early stop), once with WarmServe's engine (continuous
batching, paged KV) and once with transformers `generate` on the same prompts (left-padded
batch), in the same process. Reports generated tokens per second of wall time.

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
from warmserve.engine.kv_blocks import BlockAllocator
from warmserve.engine.llama import LlamaShape, PagedKVCache, PagedLlama
from warmserve.engine.request import SamplingParams
from warmserve.engine.scheduler import Scheduler
from warmserve.models import prepare_smollm2

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


def ours(model, ids: list[list[int]], tokens: int, dtype: torch.dtype) -> float:
    shape = LlamaShape.from_hf_config(model.config.to_dict())
    params = {k: v.to(dtype) for k, v in model.state_dict().items()}
    blocks = len(ids) * (-(-(max(map(len, ids)) + tokens) // 16)) + 1
    cache = PagedKVCache(shape, blocks, 16, dtype)
    sched = Scheduler(BlockAllocator(blocks, 16), max_batched_tokens=4096, max_seqs=len(ids))
    engine = Engine(PagedLlama(shape, params), cache, sched, eos_token_id=None)
    t0 = time.perf_counter()
    out = engine.generate(ids, SamplingParams(max_tokens=tokens, ignore_eos=True))
    wall = time.perf_counter() - t0
    assert all(len(o) == tokens for o in out)
    return len(ids) * tokens / wall


def transformers_generate(
    model, tok, ids: list[list[int]], tokens: int, dtype: torch.dtype
) -> float:
    m = model.to(dtype)
    width = max(map(len, ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batch = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    t0 = time.perf_counter()
    with torch.no_grad():
        out = m.generate(batch, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                         do_sample=False, pad_token_id=pad)  # fmt: skip
    wall = time.perf_counter() - t0
    assert out.shape[1] - width == tokens
    return len(ids) * tokens / wall


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    path = prepare_smollm2()
    tok = AutoTokenizer.from_pretrained(path)
    rows = []
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for c in (int(x) for x in args.concurrency.split(",")):
            ids = prompts(tok, c)
            ours(model, ids[:1], 2, dtype)  # warm-up
            w = ours(model, ids, args.tokens, dtype)
            t = transformers_generate(model, tok, ids, args.tokens, dtype)
            model = model.float()
            row = {"concurrency": c, "dtype": dtype_name, "warmserve_tok_s": round(w, 1),
                   "transformers_tok_s": round(t, 1), "ratio": round(w / t, 2)}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_json(args.json, {"benchmark": "engine_throughput", "model": "SmolLM2-135M-Instruct",
                           "tokens_per_request": args.tokens, "results": rows})  # fmt: skip


if __name__ == "__main__":
    main()
