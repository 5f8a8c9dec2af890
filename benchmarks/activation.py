"""Time to first token when a model must start serving on a worker, by how its weights arrive.

For SmolLM2-135M (fp32, 540 MB) and a random ~1.2 GB Llama-style model (fp32), on CPU
(fp32: this CPU's torch runs bf16 prefill matmuls ~7x slower, which would swamp the rest) or,
with `--device cuda`, on a GPU through the CUDA VMM page backend:
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
import tempfile
import time
from pathlib import Path

import torch
from bench_output import write_json
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from warmserve.calibration.measure import drop_page_cache
from warmserve.engine.request import SamplingParams
from warmserve.models import prepare_smollm2
from warmserve.worker.cuda_pages import CudaPages
from warmserve.worker.pages import CpuPages
from warmserve.worker.pool import PagePool
from warmserve.worker.worker import UniversalWorker

PROMPT = list(range(100, 164))  # 64 tokens


def big_model(root: Path, layers: int = 8) -> Path:
    """A random Llama-style model, fp32: 8 layers make 1.2 GB."""
    path = root / f"random-llama-{layers}l-fp32"
    if not (path / "config.json").exists():
        cfg = LlamaConfig(hidden_size=1536, intermediate_size=4096, num_hidden_layers=layers,
                          num_attention_heads=12, num_key_value_heads=4, vocab_size=32000,
                          tie_word_embeddings=False)  # fmt: skip
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(path)  # fp32
    return path


def make_pages(device: str, pages: int):
    if device == "cpu":
        return CpuPages(pages)
    return CudaPages(pages, device=torch.device(device).index or 0)


def first_token(engine) -> None:
    out = engine.generate([PROMPT], SamplingParams(max_tokens=1, ignore_eos=True))
    assert len(out[0]) == 1


def measure(name: str, path: Path, other: Path, pages: int, device: str) -> dict:
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    row: dict = {"model": name, "weights_bytes": size, "device": device}
    # Untimed warm-up: torch's first-call costs are the same for every path; keep them out.
    pool = PagePool(make_pages(device, pages))
    warm = UniversalWorker(pool)
    warm.prewarm(name, path)
    first_token(warm.activate(name))
    pool.close()
    # prewarmed: both models resident, activate one
    pool = PagePool(make_pages(device, pages))
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
        if drop and not drop_page_cache():
            row[label] = None
            continue
        pool = PagePool(make_pages(device, pages))
        worker = UniversalWorker(pool)
        t0 = time.perf_counter()
        worker.prewarm(name, path)
        t1 = time.perf_counter()
        first_token(worker.activate(name))
        row[label] = round((time.perf_counter() - t0) * 1e3, 1)
        row[label.replace("ttft", "load")] = round((t1 - t0) * 1e3, 1)
        pool.close()
    drop_page_cache()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT], device=device), max_new_tokens=1,
                             do_sample=False)  # fmt: skip
    assert len(out[0].tolist()) == len(PROMPT) + 1  # .tolist() waits for the device
    del model
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
    ap.add_argument("--device", default="cpu", help="cpu, or cuda[:N] (the CUDA VMM backend)")
    ap.add_argument("--models", default="smollm2,big", help="comma-separated: smollm2 and/or big")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = args.models.split(",")
    if not set(names) <= {"smollm2", "big"}:
        ap.error(f"unknown model in --models {args.models!r}: use smollm2 and/or big")
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"big": ("random-llama-1.2GB", big_model(Path(tmp)))}
        if "smollm2" in names:
            paths["smollm2"] = ("SmolLM2-135M-Instruct", prepare_smollm2(dtype="float32"))
        else:  # the model resident beside the measured one, whose pages become KV
            paths["smollm2"] = ("random-llama-0.3GB", big_model(Path(tmp), layers=2))
        rows = []
        for key in names:
            other = paths["big" if key == "smollm2" else "smollm2"][1]
            name, path = paths[key]
            rows.append(measure(name, path, other, pages=1024, device=args.device))
    for r in rows:
        print(json.dumps(r))
    write_json(args.json, {"benchmark": "activation", "results": rows})


if __name__ == "__main__":
    main()
