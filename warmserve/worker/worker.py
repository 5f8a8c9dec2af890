"""The universal worker: several models' weights resident in one pool, one of them serving.

`prewarm` loads a model's weights into a slot. `activate` makes one model the serving
instance: the other prewarmed models are evicted and their pages become the KV cache of the
new instance by remapping, with no copy of weights or KV. `deactivate` drops the KV and keeps
the weights prewarmed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from warmserve.engine.engine import Engine
from warmserve.engine.kv_blocks import BlockAllocator
from warmserve.engine.llama import LlamaShape, PagedKVCache, PagedLlama
from warmserve.engine.scheduler import Scheduler
from warmserve.worker.pool import PagePool, PageUse, Slot
from warmserve.worker.weights import load_into_slot, slot_view


@dataclass(slots=True)
class Resident:
    name: str
    shape: LlamaShape
    slot: Slot
    params: dict[str, torch.Tensor]
    eos_token_id: int | None


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    pages: dict[str, int]  # by use
    prewarmed: tuple[str, ...]
    serving: str | None
    kv_blocks: int
    in_flight: int


class UniversalWorker:
    def __init__(self, pool: PagePool, block_size: int = 16) -> None:
        self.pool = pool
        self.block_size = block_size
        self.resident: dict[str, Resident] = {}
        self.serving: str | None = None
        self.engine: Engine | None = None
        self._kv_slot: Slot | None = None

    def prewarm(self, name: str, model_dir: Path) -> None:
        cfg = json.loads((model_dir / "config.json").read_text())
        slot = self.pool.new_slot(PageUse.WEIGHTS)
        params = load_into_slot(self.pool, slot, sorted(model_dir.glob("*.safetensors")))
        eos = cfg.get("eos_token_id")
        self.resident[name] = Resident(
            name,
            LlamaShape.from_hf_config(cfg),
            slot,
            params,
            eos if isinstance(eos, int) else None,
        )

    def evict(self, name: str) -> None:
        assert name != self.serving, "deactivate before evicting the serving model"
        self.pool.free_slot(self.resident.pop(name).slot)

    def activate(self, name: str) -> Engine:
        """Serve `name`: evict every other prewarmed model, KV over all the pages then free."""
        assert self.serving is None, "deactivate first"
        model = self.resident[name]
        for other in [n for n in self.resident if n != name]:
            self.evict(other)
        s = model.shape
        block_bytes = 2 * s.num_layers * self.block_size * s.num_kv_heads * s.head_dim * 4
        kv = self.pool.new_slot(PageUse.KV)
        free_pages = self.pool.counts()[PageUse.FREE]
        self.pool.grow(kv, free_pages)
        self.pool.wait_mapped(kv, free_pages)
        num_blocks = free_pages * self.pool.page_bytes // block_bytes
        if num_blocks < 1:
            self.pool.free_slot(kv)
            raise RuntimeError(f"no room for KV: {free_pages} free pages")
        cache = PagedKVCache.from_buffer(s, slot_view(kv, free_pages * self.pool.page_bytes),
                                         num_blocks, self.block_size, torch.float32)  # fmt: skip
        sched = Scheduler(BlockAllocator(num_blocks, self.block_size))
        self.engine = Engine(PagedLlama(s, model.params), cache, sched, model.eos_token_id)
        self._kv_slot, self.serving = kv, name
        return self.engine

    def deactivate(self) -> None:
        """Drop the KV cache; the weights stay prewarmed."""
        assert self._kv_slot is not None and self.engine is not None
        for rid in list(self.engine.scheduler.requests):
            self.engine.abort(rid)
        self.engine = None
        self.pool.free_slot(self._kv_slot)
        self._kv_slot, self.serving = None, None

    def status(self) -> WorkerStatus:
        eng = self.engine
        return WorkerStatus(
            pages={u.name.lower(): n for u, n in self.pool.counts().items()},
            prewarmed=tuple(n for n in self.resident if n != self.serving),
            serving=self.serving,
            kv_blocks=eng.scheduler.alloc.num_blocks if eng else 0,
            in_flight=len(eng.scheduler.requests) if eng else 0,
        )
