"""The accelerator description the simulator's latency and load-time models take.

Its figures for each kind of device live in device profiles (warmserve/profiles.py,
warmserve/data/profiles/*.yaml), each with its source.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1 << 30
PAGE_BYTES = 2 << 20  # 2 MiB: the CUDA VMM allocation granularity on current NVIDIA GPUs


@dataclass(frozen=True, slots=True)
class GpuSpec:
    name: str
    peak_flops: float  # dense FLOP/s in the serving dtype (bf16 on GPUs)
    hbm_bandwidth: float  # device memory bytes/s (HBM; DRAM for a CPU)
    memory_bytes: int
    host_to_device_bandwidth: float  # pinned H2D bytes/s per GPU, as measured, not the PCIe spec
    nvlink_bandwidth: float  # bytes/s per direction


def pages_for(num_bytes: float, page_bytes: int = PAGE_BYTES) -> int:
    """Whole pages needed to hold `num_bytes`."""
    return int(-(-int(num_bytes) // page_bytes))
