"""Start-up and load costs of the simulated cluster. Every figure is an assumption; see docs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class StartupCosts:
    # Prewarm hit: a parked engine process attaches to resident weights (no copy). The reference
    # reports no figure; Python engine construction is a few hundred ms.
    engine_attach_s: float = 0.3
    # Raw CUDA VMM mapping runs at ~0.2 s per 10 GB; KV is mapped lazily, so only the first
    # part of the KV range is on the critical path.
    remap_bandwidth: float = 50e9
    kv_initial_map_bytes: float = 1 << 30
    # Where prewarm and warm-path loads read weights: pinned host DRAM (the GPU's H2D bandwidth)
    # or local NVMe.
    weights_source: Literal["host", "ssd"] = "host"
    ssd_bandwidth: float = 7e9  # bytes/s per GPU's share of a node's NVMe
    # Vanilla autoscaling: a fresh engine process (imports, CUDA context, NCCL, profiling run)
    # plus a plain safetensors load (ServerlessLLM's H100 figure: Llama-3.1-8B in 4.44 s).
    cold_engine_init_s: float = 10.0
    vanilla_load_bandwidth: float = 3.6e9
    # A node's host memory and PCIe switches deliver this many bytes/s to its devices in all;
    # concurrent loads on the node share it fairly (sim/host_link.py). None: no node limit.
    # 52 GB/s: ServerlessLLM's H100 SXM node loads Qwen3-32B (65.5 GB) from DRAM in 1.253 s,
    # the only published whole-checkpoint DRAM -> GPU rate on such a node (about one PCIe
    # Gen5 link's worth); see the device profiles and docs/simulator.md for the band.
    host_node_bandwidth: float | None = 52e9
    # ServerlessLLM baseline: a vLLM engine starts per instance (process, imports, profiling
    # run, KV allocation, CUDA-graph capture: ServerlessLLM's vLLM backend leaves
    # enforce_eager off), then its loader streams the checkpoint SSD -> DRAM -> GPU.
    # 34 s: vLLM issue #20264, "init engine (profile, create kv cache, warmup model) took
    # 34.11 seconds" (graph capture 17 s) after a 0.9 s weight load. SSD: 29.4 GB/s, its H100
    # node's NVMe array; DRAM cache per node.
    serverless_engine_init_s: float = 34.0
    # serverlessllm-tuned: the same loader with a 2 s engine start (an assumption: imports
    # warm, no graph capture), as this baseline was before it was split.
    serverless_tuned_engine_init_s: float = 2.0
    serverless_ssd_bandwidth: float = 29.4e9
    serverless_dram_cache_bytes: float = 512 * 2**30

    def __post_init__(self) -> None:
        for name in (
            "remap_bandwidth",
            "ssd_bandwidth",
            "vanilla_load_bandwidth",
            "serverless_ssd_bandwidth",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        for name in (
            "engine_attach_s",
            "kv_initial_map_bytes",
            "cold_engine_init_s",
            "serverless_engine_init_s",
            "serverless_tuned_engine_init_s",
            "serverless_dram_cache_bytes",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.host_node_bandwidth is not None and self.host_node_bandwidth <= 0:
            raise ValueError("host_node_bandwidth must be > 0 (or null: no node limit)")
        if self.weights_source not in ("host", "ssd"):
            raise ValueError("weights_source must be 'host' or 'ssd'")
