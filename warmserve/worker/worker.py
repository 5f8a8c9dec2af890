"""The universal worker: several models' weights resident in one pool, one of them serving.

`prewarm` loads a model's weights into a slot, on a background thread if asked, while the
serving engine keeps stepping. `activate` makes one model the serving instance: the other
prewarmed models are evicted and their pages become the KV cache of the new instance by
remapping, with no copy of weights or KV. `deactivate` drops the KV and keeps the weights
prewarmed. Pool books are touched under one lock (the loader thread and the caller share
them); tensor copies and engine steps run outside it.

A rank of a tensor-parallel instance holds only its shard (`engine.tp`): `prewarm` with
`tp_rank`/`tp_size` loads that rank's slices, and `activate` with a `TPGroup` agrees with the
group's other ranks on the KV blocks (the same block ids must fit every rank's cache, whose
blocks differ in size where ranks own unequal KV heads) and builds a lockstep engine.

On a CPU, a worker running one torch thread stores its projection weights and LM head packed
for the CPU linear kernel (`engine.cpu_linear`; `pack_weights` overrides the choice).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from warmserve.engine import cpu_linear
from warmserve.engine.engine import Engine
from warmserve.engine.kv_blocks import BlockAllocator
from warmserve.engine.llama import LlamaShape, PagedKVCache, PagedLlama
from warmserve.engine.scheduler import Scheduler
from warmserve.engine.tp import TPGroup, shard_plan, shard_shape
from warmserve.hardware import pages_for
from warmserve.model_spec import read_hf_config
from warmserve.worker.layout import checkpoint_files, sharded_layout, weights_layout
from warmserve.worker.pool import PagePool, PageUse, Slot
from warmserve.worker.weights import LoadCancelled, copy_into_slot, slot_view


class WorkerError(RuntimeError):
    pass


@dataclass(slots=True)
class Resident:
    name: str
    shape: LlamaShape
    slot: Slot
    params: dict[str, torch.Tensor]
    eos_token_id: int | None
    tp_size: int = 1


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    pages: dict[str, int]  # by use
    prewarmed: tuple[str, ...]
    loading: tuple[str, ...]
    serving: str | None
    kv_blocks: int
    kv_used_blocks: int
    in_flight: int


class UniversalWorker:
    def __init__(
        self, pool: PagePool, block_size: int = 16, pack_weights: bool | None = None
    ) -> None:
        self.pool = pool
        self.pack_weights = cpu_linear.use_packing(pool.backend.device, pack_weights)
        self.block_size = block_size
        self.resident: dict[str, Resident] = {}
        self.serving: str | None = None
        self.engine: Engine | None = None
        self._kv_slot: Slot | None = None
        self._lock = threading.Lock()
        self._loader = ThreadPoolExecutor(1, "prewarm")
        self._loading: dict[str, tuple[Future[float], threading.Event]] = {}
        self._block_bytes = 0

    # ----- weights ----------------------------------------------------------------------
    def prewarm(
        self,
        name: str,
        model_dir: Path,
        *,
        background: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> Future[float]:
        """Load `name` (rank `tp_rank`'s shard of it at TP `tp_size`) into a slot; the future
        gives the load's seconds (or its error)."""
        with self._lock:
            if name in self.resident or name in self._loading:
                raise WorkerError(f"model {name!r} is already resident")
            cancel = threading.Event()
            fut = self._loader.submit(self._load, name, model_dir, cancel, tp_rank, tp_size)
            self._loading[name] = (fut, cancel)
        if not background:
            fut.result()
        return fut

    def _load(
        self, name: str, model_dir: Path, cancel: threading.Event, tp_rank: int, tp_size: int
    ) -> float:
        t0 = time.perf_counter()
        try:
            cfg = read_hf_config(model_dir)
            shape = LlamaShape.from_hf_config(cfg, name)
            if tp_size > 1:
                shard = shard_plan(shape, tp_size)[tp_rank]
                layout, total = sharded_layout(checkpoint_files(model_dir), shard, shape)
                shape = shard_shape(shape, shard)  # the model this rank runs
            else:
                layout, total = weights_layout(checkpoint_files(model_dir))
            # Refused before a page is taken: a tensor missing, unused or of the wrong shape.
            shape.check_tensors(name, {t.name: t.shape for t in layout})
            pages = max(1, pages_for(total, self.pool.page_bytes))
            with self._lock:
                slot = self.pool.new_slot(PageUse.WEIGHTS)
                try:  # free pages, or pages a serving KV cache lent to prewarming
                    self.pool.grow(slot, pages, borrow=True)
                except Exception:
                    self.pool.free_slot(slot)
                    raise
            pack = None
            if self.pack_weights:
                pack = functools.partial(cpu_linear.packable, tied=shape.tie_word_embeddings)
            try:
                params = copy_into_slot(self.pool, slot, layout, pages, cancel, pack=pack)
            except BaseException:
                with self._lock:
                    self.pool.free_slot(slot)
                raise
            eos = cfg.get("eos_token_id")
            with self._lock:
                self.resident[name] = Resident(
                    name, shape, slot, params, eos if isinstance(eos, int) else None, tp_size
                )
        finally:
            with self._lock:
                self._loading.pop(name, None)
        return time.perf_counter() - t0

    def wait_loads(self) -> None:
        """Wait for every load in progress (cancelled ones included)."""
        with self._lock:
            futures = [f for f, _ in self._loading.values()]
        for f in futures:
            with contextlib.suppress(Exception):  # its own caller sees the error
                f.result()

    def cancel_loads(self, keep: str | None = None) -> None:
        """Cancel every load in progress except `keep`'s (they stop between tensors)."""
        with self._lock:
            for name, (_, cancel) in self._loading.items():
                if name != keep:
                    cancel.set()

    def evict(self, name: str) -> None:
        """Drop a prewarmed model's weights; a load in progress is cancelled."""
        if name == self.serving:
            raise WorkerError("deactivate before evicting the serving model")
        with self._lock:
            loading = self._loading.get(name)
            if loading is not None:
                loading[1].set()
        if loading is not None:
            try:
                loading[0].result()
            except LoadCancelled:
                return
        with self._lock:
            res = self.resident.pop(name, None)
            if res is None:
                raise WorkerError(f"model {name!r} is not resident")
            self.pool.free_slot(res.slot)

    # ----- serving ----------------------------------------------------------------------
    def activate(
        self,
        name: str,
        kv_dtype: torch.dtype | None = None,
        tp: TPGroup | None = None,
        kv_pages: int | None = None,
    ) -> Engine:
        """Serve `name`: evict every other prewarmed model, KV over all the pages then free
        (at most `kv_pages` of them: a TP instance's books give every rank the same count).

        Waits for loads in progress first (its own, and cancelled ones freeing pages). With
        `tp`, a collective over the group: every rank of it activates its shard."""
        if self.serving is not None:
            raise WorkerError(f"already serving {self.serving!r}; deactivate first")
        self.wait_loads()
        if name not in self.resident:
            raise WorkerError(f"model {name!r} is not resident")
        if self.resident[name].tp_size != (tp.size if tp is not None else 1):
            raise WorkerError(f"model {name!r} is resident as another TP shard")
        for other in [n for n in self.resident if n != name]:
            self.evict(other)
        model = self.resident[name]
        s = model.shape
        dtype = kv_dtype or next(iter(model.params.values())).dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
        block_bytes = own_bytes = PagedKVCache.block_bytes(s, self.block_size, dtype)
        with self._lock:
            free_pages = self.pool.counts()[PageUse.FREE]
        if kv_pages is not None:
            free_pages = min(free_pages, kv_pages)
        num_blocks = free_pages * self.pool.page_bytes // block_bytes
        if tp is not None:
            # Block ids are the leader's and name the same block on every rank: count blocks
            # in the largest rank's size, over the fewest pages any rank has.
            block_bytes = _all_reduce_int(block_bytes, "max", tp.group)
            num_blocks = _all_reduce_int(
                free_pages * self.pool.page_bytes // block_bytes, "min", tp.group
            )
        if num_blocks < 1:
            raise WorkerError(f"no room for KV: {free_pages} free pages")
        with self._lock:
            kv = self.pool.new_slot(PageUse.KV)
            self.pool.grow(kv, free_pages)
        self.pool.wait_mapped(kv, free_pages)
        buf = slot_view(self.pool, kv, free_pages * self.pool.page_bytes)
        del own_bytes  # (the cache's own blocks are no larger than `block_bytes`)
        cache = PagedKVCache.from_buffer(s, buf, num_blocks, self.block_size, dtype)
        sched = Scheduler(BlockAllocator(num_blocks, self.block_size))
        if tp is None:
            self.engine = Engine(
                PagedLlama(s, model.params, name=name), cache, sched, model.eos_token_id
            )
        else:
            self.engine = tp_engine(s, model.params, name, cache, sched, model.eos_token_id, tp)
        self._kv_slot, self.serving = kv, name
        self._block_bytes = block_bytes
        return self.engine

    # ----- KV lending -------------------------------------------------------------------
    @property
    def kv_pages(self) -> int:
        """Pages mapped in the serving KV slot now."""
        return len(self._kv_slot.pages) if self._kv_slot is not None else 0

    def _blocks_on(self, pages: int) -> int:
        assert self.engine is not None
        alloc = self.engine.scheduler.alloc
        return min(alloc.capacity, pages * self.pool.page_bytes // self._block_bytes)

    def lend_kv(self, pages: int) -> bool:
        """Lend the KV slot's last `pages` pages to prewarming. The blocks on them leave use
        at once; the pages are unmapped when no sequence holds those blocks any more. True
        once lent; call again (e.g. after engine steps) while False."""
        if self.engine is None or self._kv_slot is None:
            raise WorkerError("not serving")
        if not 0 <= pages < self.kv_pages:
            raise WorkerError(f"cannot lend {pages} of {self.kv_pages} KV pages")
        alloc = self.engine.scheduler.alloc
        keep = self._blocks_on(self.kv_pages - pages)
        if keep < 1:
            raise WorkerError("lending that much leaves no KV block")
        if keep < alloc.num_blocks:
            alloc.limit(keep)
        if alloc.held_above(keep):
            return False
        with self._lock:
            self.pool.lend(self._kv_slot, pages)
        return True

    def reclaim_kv(self, pages: int) -> None:
        """Map `pages` of the pages this slot lent back at its end (their borrowers must have
        been evicted) and use the blocks on them again."""
        if self.engine is None or self._kv_slot is None:
            raise WorkerError("not serving")
        with self._lock:
            self.pool.reclaim(self._kv_slot, pages)
        self.pool.wait_mapped(self._kv_slot, self.kv_pages)
        self.engine.scheduler.alloc.extend(self._blocks_on(self.kv_pages))

    def deactivate(self, keep_weights: bool = True) -> None:
        """Drop the KV cache (aborting what runs); the weights stay prewarmed if asked."""
        if self._kv_slot is None or self.engine is None or self.serving is None:
            raise WorkerError("not serving")
        for rid in list(self.engine.scheduler.requests):
            self.engine.abort(rid)
        name = self.serving
        self.engine = None
        with self._lock:
            self.pool.free_slot(self._kv_slot)
        self._kv_slot, self.serving = None, None
        if not keep_weights:
            self.evict(name)

    def status(self) -> WorkerStatus:
        eng = self.engine
        with self._lock:
            pages = {u.name.lower(): n for u, n in self.pool.counts().items()}
            loading = tuple(self._loading)
            prewarmed = tuple(n for n in self.resident if n != self.serving)
        alloc = eng.scheduler.alloc if eng else None
        return WorkerStatus(
            pages=pages,
            prewarmed=prewarmed,
            loading=loading,
            serving=self.serving,
            kv_blocks=alloc.num_blocks if alloc else 0,
            kv_used_blocks=alloc.num_used if alloc else 0,
            in_flight=len(eng.scheduler.requests) if eng else 0,
        )

    def close(self) -> None:
        with self._lock:
            for _, cancel in self._loading.values():
                cancel.set()
        self._loader.shutdown(wait=True)


def _all_reduce_int(value: int, op: str, group) -> int:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN, group=group)
    return int(t.item())


def tp_engine(shape, params, name, cache, sched, eos, tp: TPGroup) -> Engine:
    """A rank's engine of a TP instance: its shard's model, stepping in lockstep with the
    group's leader (the engine installs the group's all-reduce in the model)."""
    return Engine(PagedLlama(shape, params, name=name), cache, sched, eos, tp=tp)
