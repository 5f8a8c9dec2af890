"""Measurements for `warmserve calibrate`, with the real worker, page pool and engine.

Everything here times the code paths `warmserve serve` runs: `UniversalWorker.prewarm` (the
load into a pool slot), `activate` (the engine over the resident weights, KV over the free
pages), `Engine.step` (continuous batching) and a spawned worker process until it is ready.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from warmserve.calibration.fit import StepSample
from warmserve.engine.request import SamplingParams
from warmserve.model_spec import ModelSpec, read_hf_config, spec_from_hf_config
from warmserve.worker.pages import CpuPages
from warmserve.worker.pool import PagePool, PageUse
from warmserve.worker.worker import UniversalWorker

MODEL_CHOICES = ("smollm2", "random-2l", "random-8l")


@dataclass(frozen=True, slots=True)
class CalibrationConfig:
    device: str = "cpu"  # cpu or cuda[:N]
    models: tuple[str, ...] = ("smollm2", "random-2l", "random-8l")
    quick: bool = False
    threads: int = 1  # torch threads, as one serve worker gets
    pool_mib: int = 1536  # the page pool, as a serve worker's (workers.pool_mib)
    page_mib: int = 2
    drop_caches: bool = False  # time loads from disk too (drops the whole machine's page cache)
    seed: int = 0
    # Step times of the first model only (the one served); the others give load and
    # activation times by size. The step-time model counts 2 FLOPs per parameter per token,
    # embeddings included: right for 7B+ models, but for a small model with a large untied
    # vocabulary (random-2l: 2/3 of its weights) it overcounts several-fold, and fitting both
    # at once fits neither.
    steps_all: bool = False

    @property
    def repeats(self) -> int:
        return 1 if self.quick else 3

    def grid(self) -> list[tuple[int, int]]:
        """(batch, prompt length) points; each gives a prefill and a run of decode steps.
        At most 1,024 tokens a step: one prefill step (the engine's budget is 2,048)."""
        batches = (1, 4, 16) if self.quick else (1, 2, 4, 8, 16, 32)
        lengths = (16, 128) if self.quick else (16, 64, 256)
        return [(b, n) for n in lengths for b in batches if b * n <= 1024]


@dataclass(frozen=True, slots=True)
class ModelTiming:
    name: str
    weights_bytes: int
    load_cached_s: tuple[float, ...]  # prewarm with the checkpoint in the page cache
    load_disk_s: tuple[float, ...]  # after dropping the page cache (empty unless asked)
    activate_s: tuple[float, ...]  # resident weights -> serving engine
    kv_bytes: int  # KV mapped by the activation (every free page of the pool)


@dataclass(frozen=True, slots=True)
class Measurements:
    device: str
    device_name: str
    threads: int
    peak_flops: float  # best dense matmul FLOP/s seen (fp32 on CPU, bf16 on CUDA)
    memory_bandwidth: float  # best copy bytes/s (read + write) in device memory
    memory_bytes: int  # the page pool (CPU) or the device's memory (CUDA)
    host_to_device_bandwidth: float | None  # CUDA: pinned host -> device copy; None on CPU
    kv_map_bandwidth: float  # bytes/s of mapping fresh KV pages into a slot
    process_start_s: tuple[float, ...]  # spawn a serve worker process until it is ready
    models: tuple[ModelTiming, ...]
    steps: tuple[StepSample, ...]
    specs: dict[str, ModelSpec] = field(default_factory=dict)
    host_cores: int = 0  # CPUs this process may run on (the shared host's cores); 0: unknown


def random_llama(root: Path, layers: int) -> Path:
    """A random Llama-style fp32 model (hidden 1536, vocab 32000): 2 layers ≈ 0.5 GB,
    8 layers ≈ 1.2 GB. Seeded, so every calibration times the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = root / f"random-{layers}l"
    if not (path / "config.json").exists():
        cfg = LlamaConfig(hidden_size=1536, intermediate_size=4096, num_hidden_layers=layers,
                          num_attention_heads=12, num_key_value_heads=4, vocab_size=32000,
                          max_position_embeddings=2048, tie_word_embeddings=False)  # fmt: skip
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def model_dir(key: str, tmp: Path) -> Path:
    if key == "smollm2":
        from warmserve.models import prepare_smollm2

        return prepare_smollm2(dtype="float32")
    if key.startswith("random-") and key.endswith("l") and key[7:-1].isdigit():
        return random_llama(tmp, int(key[7:-1]))
    raise ValueError(f"unknown calibration model {key!r} (known: {', '.join(MODEL_CHOICES)})")


def _pages(cfg: CalibrationConfig):
    n = cfg.pool_mib // cfg.page_mib
    if cfg.device == "cpu":
        return CpuPages(n, cfg.page_mib << 20)
    from warmserve.worker.cuda_pages import CudaPages  # CUDA VMM: needs a GPU

    return CudaPages(n, device=torch.device(cfg.device).index or 0)


def _sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


# ----- the device's own peaks ---------------------------------------------------------------
def measure_peaks(device: str, quick: bool) -> tuple[float, float]:
    """(FLOP/s, bytes/s): the best of a few dense matmuls and large copies. The step-time
    model's efficiencies are relative to these, so they are what this device can do at all."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    n = 1024 if device == "cpu" else 8192
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    best_mm = float("inf")
    for _ in range(3 if quick else 6):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best_mm = min(best_mm, time.perf_counter() - t0)
    size = (256 << 20) if device == "cpu" else (2 << 30)
    x = torch.empty(size // 4, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x)
    best_cp = float("inf")
    for _ in range(3 if quick else 6):
        _sync(device)
        t0 = time.perf_counter()
        y.copy_(x)
        _sync(device)
        best_cp = min(best_cp, time.perf_counter() - t0)
    return 2.0 * n**3 / best_mm, 2.0 * size / best_cp


def measure_h2d(device: str, quick: bool) -> float:
    """CUDA only: pinned host -> device bytes/s, best of a few 1 GiB copies."""
    size = 1 << 30
    host = torch.empty(size, dtype=torch.uint8).pin_memory()
    dev = torch.empty(size, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(2 if quick else 5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return size / best


def measure_kv_map(cfg: CalibrationConfig) -> float:
    """Bytes/s of growing a KV slot over fresh pages (the pool maps them in the background;
    the activation waits for them), best of a few."""
    best = float("inf")
    n = (cfg.pool_mib // cfg.page_mib) // 2
    for _ in range(cfg.repeats + 1):
        pool = PagePool(_pages(cfg))
        try:
            slot = pool.new_slot(PageUse.KV)
            t0 = time.perf_counter()
            pool.grow(slot, n)
            pool.wait_mapped(slot, n)
            best = min(best, time.perf_counter() - t0)
        finally:
            pool.close()
    return n * (cfg.page_mib << 20) / best


def measure_process_start(cfg: CalibrationConfig) -> tuple[float, ...]:
    """Seconds from spawning a serve worker process to its Ready (interpreter, imports, torch,
    the page pool pre-faulted). The server's workers are CPU ones."""
    from warmserve.runtime import messages as m
    from warmserve.runtime.worker_process import WorkerProcess
    from warmserve.serve_config import WorkerConfig

    out = []
    for _ in range(max(2, cfg.repeats)):
        ready = threading.Event()
        wcfg = WorkerConfig(count=1, pool_mib=cfg.pool_mib, page_mib=cfg.page_mib,
                            threads=cfg.threads)  # fmt: skip

        def on_event(_w: int, _i: int, ev: object, ready: threading.Event = ready) -> None:
            if isinstance(ev, m.Ready):
                ready.set()

        t0 = time.perf_counter()
        proc = WorkerProcess(0, 0, wcfg, on_event, lambda _w, _i: None)
        try:
            if not ready.wait(wcfg.startup_timeout_s):
                raise RuntimeError("the worker process did not start")
            out.append(time.perf_counter() - t0)
            proc.send(m.Shutdown())
        finally:
            proc.stop(10.0)
    return tuple(out)


# ----- a model: loads, activations, steps ---------------------------------------------------
def _run_point(engine, batch: int, length: int, decode_steps: int, vocab: int,
               rng: np.random.Generator, device: str) -> tuple[float, list[float]]:  # fmt: skip
    """One prefill of `batch` prompts of `length` tokens, then `decode_steps` decode steps of
    the whole batch: the seconds of each."""
    params = SamplingParams(max_tokens=decode_steps + 1, ignore_eos=True)
    for row in rng.integers(10, vocab - 1, size=(batch, length)):
        engine.add(row.tolist(), params)
    _sync(device)
    t0 = time.perf_counter()
    out = engine.step()
    _sync(device)
    prefill = time.perf_counter() - t0
    if len(out.tokens) != batch:
        raise RuntimeError(f"prefill of {batch}x{length} did not run as one step")
    decode = []
    for _ in range(decode_steps):
        t0 = time.perf_counter()
        out = engine.step()
        _sync(device)
        decode.append(time.perf_counter() - t0)
        if len(out.tokens) != batch:
            raise RuntimeError("a decode step did not run the whole batch")
    while engine.scheduler.has_work():
        engine.step()
    return prefill, decode


def measure_model(
    cfg: CalibrationConfig, key: str, path: Path, tick: Callable[[str], None], steps: bool
) -> tuple[ModelTiming, list[StepSample], ModelSpec]:
    hf = read_hf_config(path / "config.json")
    spec = spec_from_hf_config(key, hf)
    vocab = int(hf["vocab_size"])
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    rng = np.random.default_rng(cfg.seed)
    pool = PagePool(_pages(cfg))
    worker = UniversalWorker(pool)
    try:
        worker.prewarm(key, path)  # untimed: brings the checkpoint into the page cache
        loads, disk, acts = [], [], []
        for _ in range(cfg.repeats):
            worker.evict(key)
            loads.append(worker.prewarm(key, path).result())
        tick(f"{key}: loads")
        if cfg.drop_caches:
            for _ in range(cfg.repeats):
                worker.evict(key)
                if not drop_page_cache():
                    raise RuntimeError("cannot drop the page cache (needs root)")
                disk.append(worker.prewarm(key, path).result())
        engine = worker.activate(key)
        _run_point(engine, 1, 16, 2, vocab, rng, cfg.device)  # untimed warm-up
        for _ in range(cfg.repeats):
            worker.deactivate(keep_weights=True)
            _sync(cfg.device)
            t0 = time.perf_counter()
            engine = worker.activate(key)
            _sync(cfg.device)
            acts.append(time.perf_counter() - t0)
        kv_bytes = worker.kv_pages * pool.page_bytes
        tick(f"{key}: activation")
        samples: list[StepSample] = []
        num = 4 if cfg.quick else 6
        for batch, length in cfg.grid() if steps else ():
            pre, dec = [], []
            for _ in range(cfg.repeats):
                p, d = _run_point(engine, batch, length, num, vocab, rng, cfg.device)
                pre.append(p)
                dec.append(statistics.median(d))
            # The fastest repeat: on a shared machine other jobs only ever add time.
            pre_s = min(pre)
            samples.append(
                StepSample(key, "prefill", batch, batch * length, float(batch * length**2), pre_s)
            )
            # The median decode step sits mid-run: context length + 1 + num / 2 a sequence.
            ctx = batch * (length + 1 + num / 2)
            samples.append(StepSample(key, "decode", batch, batch, ctx, min(dec)))
            tick(f"{key}: batch {batch} x {length}")
        worker.deactivate(keep_weights=False)
    finally:
        worker.close()
        pool.close()
    timing = ModelTiming(key, size, tuple(loads), tuple(disk), tuple(acts), kv_bytes)
    return timing, samples, spec


def total_ticks(cfg: CalibrationConfig) -> int:
    stepped = len(cfg.models) if cfg.steps_all else 1
    return 3 + 2 * len(cfg.models) + stepped * len(cfg.grid())


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_calibration(cfg: CalibrationConfig, tick: Callable[[str], None]) -> Measurements:
    """Every measurement of a profile; `tick` is called after each step of the work."""
    if cfg.device != "cpu" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {cfg.device}: no CUDA device visible to PyTorch")
    with _threads(cfg.threads), tempfile.TemporaryDirectory() as tmp:
        flops, bw = measure_peaks(cfg.device, cfg.quick)
        h2d = measure_h2d(cfg.device, cfg.quick) if cfg.device != "cpu" else None
        tick("device peaks")
        kv_map = measure_kv_map(cfg)
        tick("KV mapping")
        starts = measure_process_start(cfg)
        tick("process start")
        timings, samples, specs = [], [], {}
        for k, key in enumerate(cfg.models):
            steps = cfg.steps_all or k == 0
            t, s, spec = measure_model(cfg, key, model_dir(key, Path(tmp)), tick, steps)
            timings.append(t)
            samples += s
            specs[key] = spec
    if cfg.device == "cpu":
        name, memory = _cpu_name(), cfg.pool_mib << 20
    else:
        props = torch.cuda.get_device_properties(torch.device(cfg.device))
        name, memory = props.name, int(props.total_memory)
    return Measurements(cfg.device, name, cfg.threads, flops, bw, memory, h2d, kv_map, starts,
                        tuple(timings), tuple(samples), specs,
                        len(os.sched_getaffinity(0)))  # fmt: skip


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "CPU"
