"""Time to first token when a model must start serving on a worker, by how its weights arrive.

For SmolLM2-135M (fp32, 540 MB) and a random ~1.2 GB Llama-style model (fp32), on CPU
(fp32: this CPU's torch runs bf16 prefill matmuls ~7x slower, which would swamp the rest):
  prewarmed     weights already in a pool slot: activate (evict the other resident model,
                KV over its pages), then the first token of one request;
  cold_cached   load safetensors into a slot (page cache warm), activate, first token;
  cold_disk     the same after dropping the page cache (needs root; else reported as null);
  transformers  `from_pretrained` then `generate(max_new_tokens=1)`.
`bytes_copied_on_activate` counts bytes the pool copied during activation (must be 0);
`activate_ms` is the activation alone and `cold_*_load_ms` the weight load alone. On CPU the
first token's prefill (same in every path) is a large part of each TTFT.

    python benchmarks/activation.py --json results/bench/activation.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from bench_output import write_json
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from warmserve.engine.request import SamplingParams
from warmserve.models import prepare_smollm2
from warmserve.worker.pages import CpuPages
from warmserve.worker.pool import PagePool
from warmserve.worker.worker import UniversalWorker

PROMPT = list(range(100, 164))  # 64 tokens


def big_model(root: Path) -> Path:
    path = root / "random-1gb-fp32"
    if not (path / "config.json").exists():
        cfg = LlamaConfig(hidden_size=1536, intermediate_size=4096, num_hidden_layers=8,
                          num_attention_heads=12, num_key_value_heads=4, vocab_size=32000,
                          tie_word_embeddings=False)  # fmt: skip
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(path)  # fp32
    return path


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def first_token(engine) -> None:
    out = engine.generate([PROMPT], SamplingParams(max_tokens=1, ignore_eos=True))
    assert len(out[0]) == 1


def measure(name: str, path: Path, other: Path, pages: int) -> dict:
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    row: dict = {"model": name, "weights_bytes": size}
    # Untimed warm-up: torch's first-call costs are the same for every path; keep them out.
    pool = PagePool(CpuPages(pages))
    warm = UniversalWorker(pool)
    warm.prewarm(name, path)
    first_token(warm.activate(name))
    pool.close()
    # prewarmed: both models resident, activate one
    pool = PagePool(CpuPages(pages))
    worker = UniversalWorker(pool)
    worker.prewarm(name, path)
    worker.prewarm("other", other)
    before = pool.bytes_copied
    t0 = time.perf_counter()
    engine = worker.activate(name)
    t1 = time.perf_counter()
    first_token(engine)
    row["prewarmed_ttft_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
    row["activate_ms"] = round((t1 - t0) * 1e3, 1)
    row["bytes_copied_on_activate"] = pool.bytes_copied - before
    pool.close()
    for label, drop in (("cold_cached_ttft_ms", False), ("cold_disk_ttft_ms", True)):
        if drop and not drop_caches():
            row[label] = None
            continue
        pool = PagePool(CpuPages(pages))
        worker = UniversalWorker(pool)
        t0 = time.perf_counter()
        worker.prewarm(name, path)
        t1 = time.perf_counter()
        first_token(worker.activate(name))
        row[label] = round((time.perf_counter() - t0) * 1e3, 1)
        row[label.replace("ttft", "load")] = round((t1 - t0) * 1e3, 1)
        pool.close()
    drop_caches()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        model.generate(torch.tensor([PROMPT]), max_new_tokens=1, do_sample=False)
    row["transformers_ttft_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
    row["cold_cached_over_prewarmed"] = round(
        row["cold_cached_ttft_ms"] / row["prewarmed_ttft_ms"], 1
    )
    row["transformers_over_prewarmed"] = round(
        row["transformers_ttft_ms"] / row["prewarmed_ttft_ms"], 1
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    smol = prepare_smollm2(dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        big = big_model(Path(tmp))
        rows = [measure("SmolLM2-135M-Instruct", smol, big, pages=1024),
                measure("random-llama-1.2GB", big, smol, pages=1024)]  # fmt: skip
    for r in rows:
        print(json.dumps(r))
    write_json(args.json, {"benchmark": "activation", "results": rows})


if __name__ == "__main__":
    main()
