"""Accelerator descriptions used by the simulator's latency and load-time models."""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1 << 30
PAGE_BYTES = 2 << 20  # 2 MiB: the CUDA VMM allocation granularity on current NVIDIA GPUs


@dataclass(frozen=True, slots=True)
class GpuSpec:
    name: str
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    memory_bytes: int
    host_to_device_bandwidth: float  # pinned H2D bytes/s per GPU, as measured, not the PCIe spec
    nvlink_bandwidth: float  # bytes/s per direction


# Figures: vendor spec sheets for FLOP/s, HBM and NVLink; measured pinned H2D bandwidth
# (nvbandwidth) for PCIe Gen5 (H100, ~55 GB/s) and Gen4 (A100, 24.8 GB/s).
GPU_PRESETS: dict[str, GpuSpec] = {
    "H100-SXM-80G": GpuSpec(
        name="H100-SXM-80G",
        peak_flops=989e12,
        hbm_bandwidth=3.35e12,
        memory_bytes=80 * GiB,
        host_to_device_bandwidth=55e9,
        nvlink_bandwidth=450e9,
    ),
    "A100-80G": GpuSpec(
        name="A100-80G",
        peak_flops=312e12,
        hbm_bandwidth=2.039e12,
        memory_bytes=80 * GiB,
        host_to_device_bandwidth=24.8e9,
        nvlink_bandwidth=300e9,
    ),
}


def pages_for(num_bytes: float, page_bytes: int = PAGE_BYTES) -> int:
    """Whole pages needed to hold `num_bytes`."""
    return int(-(-int(num_bytes) // page_bytes))
