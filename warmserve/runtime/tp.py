"""What one TP shard of a model takes on a worker: the books' pages and KV bytes per worker.

Read from the checkpoint's headers (no tensor is loaded), through the same shard plan the
workers load by (`engine.tp`), so the books and the slots agree to the page.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from warmserve.engine.arch import LlamaShape, read_config
from warmserve.engine.tp import shard_plan
from warmserve.hardware import pages_for
from warmserve.worker.layout import checkpoint_files, sharded_layout, weights_layout


@dataclass(frozen=True, slots=True)
class ShardSize:
    pages: int  # weight pages per worker: the largest rank's shard
    bytes: int  # that shard's bytes
    kv_bytes_per_token: float  # per worker: the largest rank's KV heads


def tp_shard_size(model_dir: Path, tp: int, page_bytes: int, kv_bytes_per_token: int) -> ShardSize:
    """The largest rank's shard (ranks own unequal KV groups where they do not divide):
    every rank's slot is booked at that size, so any rank's shard fits its booking."""
    files = checkpoint_files(model_dir)
    if tp == 1:
        _, total = weights_layout(files)
        return ShardSize(max(1, pages_for(total, page_bytes)), total, float(kv_bytes_per_token))
    shape = LlamaShape.from_hf_config(read_config(model_dir), model_dir.name)
    plan = shard_plan(shape, tp)
    total = max(sharded_layout(files, s, shape)[1] for s in plan)
    kv_share = max(len(s.kv_heads) for s in plan) / shape.num_kv_heads
    return ShardSize(max(1, pages_for(total, page_bytes)), total, kv_bytes_per_token * kv_share)
