"""Simulated GPU nodes behind the control plane's `ClusterHandle`: the books plus time.

The page books are `warmserve.cluster.books` (shared with the serving runtime); this module
gives their effects a duration. Weight loads run one shard at a time per GPU at the source's
bandwidth, and a replica is ready when all its shards are; an engine attaches to ready
weights, or starts cold (a plain engine, or through the host checkpoint caches). Every load
(prewarm, miss, cold start) crosses its node's host link (`host_link.NodeLink`), which
concurrent loads on the node share.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

from warmserve.cluster.books import Books
from warmserve.cluster.effects import (
    Activate,
    Deactivate,
    DropWeights,
    LoadWeights,
    ResizeKv,
    Route,
)
from warmserve.cluster.reads import BookReads
from warmserve.control.api import Action, ServedModel
from warmserve.sim.costs import StartupCosts
from warmserve.sim.host import HostParams, SharedHost
from warmserve.sim.host_cache import NodeCheckpointCache
from warmserve.sim.host_link import NodeLink, Transfer
from warmserve.sim.instance import SharedDevice, SimInstance, SimRequest
from warmserve.sim.latency import StepTimeModel
from warmserve.sim.loop import EventLoop
from warmserve.types import InstanceState, StartPath


@dataclass(frozen=True, slots=True)
class SimModel:
    served: ServedModel
    step_model: StepTimeModel
    prewarm_load_s: float  # one shard from the weights source into a slot, alone on its node
    vanilla_start_s: float  # full cold start of a fresh engine, alone on its node
    load_bandwidth: float = float("inf")  # a prewarm shard load's own ceiling (bytes/s)


@dataclass(slots=True)
class LoadQueue:
    """One GPU's weight loads, by load serial, one shard at a time."""

    gpu_id: int
    queue: deque[int] = field(default_factory=deque)
    loading: int | None = None
    token: int = 0  # bumped to cancel the shard in flight
    transfer: Transfer | None = None  # the shard in flight on the node's host link


@dataclass(frozen=True, slots=True)
class StartRecord:
    time_s: float
    model: str
    path: StartPath


class SimCluster(BookReads):
    def __init__(
        self,
        loop: EventLoop,
        num_nodes: int,
        gpus_per_node: int,
        pages_per_gpu: int,
        models: dict[str, SimModel],
        costs: StartupCosts,
        host_caches: list[NodeCheckpointCache] | None,
        on_first_token: Callable[[int, float], None],
        on_finish: Callable[[int, float], None],
        serverless_engine_init_s: float | None = None,
        host: HostParams | None = None,
    ) -> None:
        self.loop = loop
        num_gpus = num_nodes * gpus_per_node
        self.gpus_per_node = gpus_per_node
        self.links = [NodeLink(loop, costs.host_node_bandwidth) for _ in range(num_nodes)]
        # The backend engine's start behind the host caches (the policy's: serverlessllm's
        # cited figure, or serverlessllm-tuned's assumption).
        self.serverless_engine_init_s = (
            costs.serverless_engine_init_s
            if serverless_engine_init_s is None
            else serverless_engine_init_s
        )
        weights = {name: m.served.pages_per_gpu for name, m in models.items()}
        self.books = Books(num_gpus, gpus_per_node, weights, pages_per_device=pages_per_gpu)
        # The reads a control tick makes several times over, bound to the books' own methods:
        # what BookReads answers, one call shallower.
        self.versions = self.books.versions  # type: ignore[method-assign]
        self.instance_views = self.books.instance_views  # type: ignore[method-assign]
        self.snapshot = self.books.snapshot  # type: ignore[method-assign]
        self.demand_reads = self.books.demand_reads  # type: ignore[method-assign]
        self.loads = [LoadQueue(g) for g in range(num_gpus)]
        self.models = models
        self.costs = costs
        self.host_caches = host_caches  # None: starts load as a plain engine (vanilla)
        if host_caches is not None:
            self.books.host_view = self._host_view
        self.load_tiers: list[str] = []  # "dram" / "ssd" per host-cache load, for metrics
        self.instances: dict[int, SimInstance] = {}
        self.starts: list[StartRecord] = []
        self.requests: dict[int, SimRequest] = {}
        self._devices: dict[tuple[int, ...], SharedDevice] = {}  # co-located instances' GPUs
        self.on_kv_pressure: Callable[[int], None] | None = None  # set by the driver
        self._on_first_token = on_first_token
        self._on_finish = on_finish
        # Devices that are one host's cores share them (sim/host.py); None: GPUs, independent.
        self.hosts = (
            [SharedHost(host, loop) for _ in range(num_nodes)] if host is not None else None
        )

    # ----- ClusterHandle: reads from BookReads -------------------------------------------
    def apply(self, actions: Sequence[Action]) -> None:
        for e in self.books.apply(actions):
            if isinstance(e, Route):
                self.instances[e.instance_id].add(self.requests[e.request_id])
            elif isinstance(e, ResizeKv):  # next most frequent: a KV lend or reclaim
                inst = self.instances[e.instance_id]
                inst.kv_pages = e.kv_pages
                inst.kv_lent_pages = self.books.instances[e.instance_id].kv_lent_pages
                if e.grew:
                    inst.kv_changed()
            elif isinstance(e, Activate):
                self._activate(e)
            elif isinstance(e, Deactivate):
                gone = self.instances.pop(e.instance_id)  # its pending events find it gone
                if gone._host is not None:
                    gone._host.set_stepping(gone, False)
            elif isinstance(e, LoadWeights):
                self._queue_load(e)
            elif isinstance(e, DropWeights):
                self._cancel_load(e)
            else:  # pragma: no cover - the Effect union is closed
                raise TypeError(f"unknown effect {e!r}")

    def check_invariants(self) -> None:
        self.books.check_invariants()
        for inst in self.instances.values():
            book = self.books.instances[inst.instance_id]
            assert book.kv_pages == inst.kv_pages and book.kv_used_pages == inst.kv_used_pages

    def _host_view(self) -> tuple[tuple[frozenset[str], ...], tuple[float, ...]]:
        caches = self.host_caches or []
        return tuple(frozenset(c.cached) for c in caches), tuple(c.ssd_busy_until_s for c in caches)

    # ----- instances --------------------------------------------------------------------
    def _activate(self, e: Activate) -> None:
        m = self.models[e.model]
        inst = SimInstance(
            e.instance_id,
            e.model,
            e.devices,
            m.step_model,
            m.served.kv_bytes_per_token_per_gpu,
            self.loop,
            self._on_first_token,
            self._finished,
            self._kv_used,
            self._devices.setdefault(e.devices, SharedDevice()) if e.shared else None,
            self._kv_pressure,
            self._host_of(e.devices[0]),
        )
        book = self.books.instances[e.instance_id]
        inst.kv_pages = book.kv_pages
        now = self.loop.now()
        if e.replica_serial is None:
            self._cold_start(e, m, inst, now)
        elif e.weights_ready:
            self.loop.at(now + self._attach_s(), self._ready, inst)
        # else: the last shard's load schedules the attach (`_shard_done`)
        self.instances[e.instance_id] = inst
        self.starts.append(StartRecord(now, e.model, e.path))

    def _cold_start(self, e: Activate, m: SimModel, inst: SimInstance, now: float) -> None:
        """A fresh engine: its shards cross the node's host link (from a plain safetensors
        read, or through the host checkpoint cache), then the engine starts."""
        shard = m.served.shard_bytes
        if self.host_caches is None:
            self._load_group(e.devices, shard, self.costs.vanilla_load_bandwidth, now, inst)
            return
        node = self.books.devices[e.devices[0]].node_id
        cache = self.host_caches[node]
        tier, ssd_start, ssd_done = cache.plan_load(e.model, shard * m.served.tp, now)
        self.load_tiers.append(tier)
        if tier == "dram":
            ceiling = cache.host_to_device_bandwidth
        else:  # pipelined SSD -> DRAM -> GPUs: the SSD stream is split among the shards
            ceiling = min(cache.host_to_device_bandwidth, cache.ssd_bandwidth / m.served.tp)
        init = self.serverless_engine_init_s
        if ssd_start > now:  # the node's SSD is still reading other checkpoints
            self.loop.at(ssd_start, self._load_group, e.devices, shard, ceiling,
                         ssd_done + init, inst, init)  # fmt: skip
        else:
            self._load_group(e.devices, shard, ceiling, ssd_done + init, inst, init)

    def _load_group(
        self,
        devices: tuple[int, ...],
        shard: int,
        ceiling: float,
        not_before: float,
        inst: SimInstance,
        after_s: float | None = None,
    ) -> None:
        """One shard onto each of `devices` over their node's link; the instance is ready
        `after_s` (default: the cold engine init) after the last one lands, and not before
        `not_before`."""
        after = self.costs.cold_engine_init_s if after_s is None else after_s
        link = self.links[devices[0] // self.gpus_per_node]
        left = [len(devices)]

        def landed() -> None:
            left[0] -= 1
            if left[0] == 0:
                t = self.loop.now()
                self.loop.at(max(t + after, not_before), self._ready, inst)

        for _ in devices:
            link.start(shard, ceiling, landed)

    def _host_of(self, device: int) -> SharedHost | None:
        return None if self.hosts is None else self.hosts[self.books.devices[device].node_id]

    def _attach_s(self) -> float:
        return (
            self.costs.engine_attach_s
            + self.costs.kv_initial_map_bytes / self.costs.remap_bandwidth
        )

    def _ready(self, inst: SimInstance) -> None:
        if inst.state == InstanceState.STARTING and self.instances.get(inst.instance_id) is inst:
            self.books.mark_running(inst.instance_id)
            inst.mark_ready()

    def _kv_used(self, inst: SimInstance) -> None:
        if self.instances.get(inst.instance_id) is inst:
            self.books.set_kv_used(inst.instance_id, inst.kv_used_pages)

    def _kv_pressure(self, inst: SimInstance) -> None:
        if self.on_kv_pressure is not None and inst.instance_id in self.instances:
            self.on_kv_pressure(inst.instance_id)

    def _finished(self, inst: SimInstance, req: SimRequest, now: float) -> None:
        del self.requests[req.request_id]
        self.books.request_done(inst.instance_id, req.request_id)
        self._on_finish(req.request_id, now)  # may dispatch more work, or release `inst`

    # ----- weight loads -----------------------------------------------------------------
    def _queue_load(self, e: LoadWeights) -> None:
        for g in e.devices:
            q = self.loads[g]
            q.queue.append(e.serial)
            if q.loading is None:
                self._start_next_load(q)

    def _start_next_load(self, q: LoadQueue) -> None:
        while q.queue:
            serial = q.queue.popleft()
            rep = self.books.replica_by_serial(serial)
            if rep is None:
                continue
            q.loading = serial
            q.token += 1
            m = self.models[rep.model]
            host = self._host_of(q.gpu_id)
            if host is not None:
                # One host's cores: the load is a loader thread copying from the page cache,
                # timed by the shared-host model (there is no separate PCIe link to share).
                host.set_loading(q.gpu_id, True)
                duration = m.prewarm_load_s * host.slowdown()
                q.transfer = None
                self.loop.at(self.loop.now() + duration, self._shard_done, q, q.token)
                return
            link = self.links[q.gpu_id // self.gpus_per_node]
            q.transfer = link.start(
                m.served.shard_bytes, m.load_bandwidth, partial(self._shard_done, q, q.token)
            )
            return
        q.loading = None
        q.transfer = None
        host = self._host_of(q.gpu_id)
        if host is not None:
            host.set_loading(q.gpu_id, False)

    def _shard_done(self, q: LoadQueue, token: int) -> None:
        if token != q.token or q.loading is None:
            return  # cancelled
        rep = self.books.mark_loaded(q.loading, q.gpu_id)
        q.loading = None
        if rep is not None and rep.owner is not None:  # ready, and an instance waits on it
            inst = self.instances[rep.owner]
            self.loop.at(self.loop.now() + self._attach_s(), self._ready, inst)
        self._start_next_load(q)

    def _cancel_load(self, e: DropWeights) -> None:
        for g in e.devices:
            q = self.loads[g]
            if q.loading == e.serial:
                q.token += 1
                if q.transfer is not None:  # free its share of the node's link
                    self.links[g // self.gpus_per_node].cancel(q.transfer)
                self._start_next_load(q)
            elif e.serial in q.queue:
                q.queue.remove(e.serial)
