"""ServerlessLLM-style multi-tier checkpoint loading: SSD → host-DRAM cache (LRU) → GPU.

Each node keeps recently loaded checkpoints in host memory, least recently used first out. A
checkpoint in DRAM loads into each GPU of the group at the GPU's host-to-device bandwidth. One
that is not is read once from the node's SSD (reads queue: one at a time per node) and copied on
as it streams, then cached in DRAM.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass(slots=True)
class NodeCheckpointCache:
    capacity_bytes: float
    ssd_bandwidth: float
    host_to_device_bandwidth: float
    cached: OrderedDict[str, int] = field(default_factory=OrderedDict)  # name -> bytes, LRU first
    ssd_busy_until_s: float = float("-inf")

    def load_s(
        self, checkpoint: str, total_bytes: int, shard_bytes: int, now: float
    ) -> tuple[float, str]:
        """Seconds until the shards are on the GPUs, and the tier they came from, for a load
        alone on its node (the simulator shares the node's host link: `plan_load`)."""
        gpu_s = shard_bytes / self.host_to_device_bandwidth
        tier, start, ssd_done = self.plan_load(checkpoint, total_bytes, now)
        if tier == "dram":
            return gpu_s, tier
        # Pipelined SSD → DRAM → GPU: the slower stage sets the pace.
        return max(ssd_done - now, start - now + gpu_s), tier

    def plan_load(self, checkpoint: str, total_bytes: int, now: float) -> tuple[str, float, float]:
        """The tier a load reads from, and when its SSD read starts and ends (both `now` for
        a DRAM hit). An SSD read queues behind the node's earlier ones, then is cached."""
        if checkpoint in self.cached:
            self.cached.move_to_end(checkpoint)
            return "dram", now, now
        start = max(now, self.ssd_busy_until_s)
        self.ssd_busy_until_s = start + total_bytes / self.ssd_bandwidth
        self._insert(checkpoint, total_bytes)
        return "ssd", start, self.ssd_busy_until_s

    def _insert(self, checkpoint: str, total_bytes: int) -> None:
        if total_bytes > self.capacity_bytes:
            return
        while sum(self.cached.values()) + total_bytes > self.capacity_bytes:
            self.cached.popitem(last=False)
        self.cached[checkpoint] = total_bytes
