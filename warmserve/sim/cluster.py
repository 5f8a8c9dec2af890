"""Simulated GPU nodes behind the control plane's `ClusterHandle`.

Every GPU's memory is counted in 2 MiB pages, each page in exactly one of: free, prewarmed
weights (replicas not serving), running weights, KV cache. KV pages an instance lends to
prewarming return to `free` (and may then hold prewarmed replicas). Weight loads run one shard
at a time per GPU at the source's bandwidth; a replica is ready when all its shards are.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from warmserve.control.api import (
    Action,
    ClusterSnapshot,
    Dispatch,
    Evict,
    GpuView,
    InstanceView,
    Prewarm,
    ReplicaView,
    ServedModel,
    SetKvPages,
    StartInstance,
    StopInstance,
)
from warmserve.sim.costs import StartupCosts
from warmserve.sim.host_cache import NodeCheckpointCache
from warmserve.sim.instance import SharedDevice, SimInstance, SimRequest
from warmserve.sim.latency import StepTimeModel
from warmserve.sim.loop import EventLoop
from warmserve.types import InstanceState, StartPath


@dataclass(frozen=True, slots=True)
class SimModel:
    served: ServedModel
    step_model: StepTimeModel
    prewarm_load_s: float  # one shard from the weights source into a slot
    vanilla_start_s: float  # full cold start of a fresh engine


@dataclass(slots=True)
class SimGpu:
    gpu_id: int
    node_id: int
    total_pages: int
    free_pages: int
    prewarm_pages: int = 0
    weights_pages: int = 0
    kv_pages: int = 0
    instance_ids: list[int] = field(default_factory=list)  # several only when co-located
    load_queue: deque[int] = field(default_factory=deque)
    loading: int | None = None
    load_token: int = 0


@dataclass(slots=True)
class SimReplica:
    replica_id: int
    model: str
    gpus: tuple[int, ...]
    pages_per_gpu: int
    pending: set[int]  # GPUs whose shard is not loaded yet
    owner: int | None = None  # the instance serving from these weights

    @property
    def is_ready(self) -> bool:
        return not self.pending


@dataclass(frozen=True, slots=True)
class StartRecord:
    time_s: float
    model: str
    path: StartPath


class SimCluster:
    def __init__(
        self,
        loop: EventLoop,
        num_nodes: int,
        gpus_per_node: int,
        pages_per_gpu: int,
        models: dict[str, SimModel],
        costs: StartupCosts,
        unified_memory: bool,
        host_caches: list[NodeCheckpointCache] | None,
        on_first_token: Callable[[int, float], None],
        on_finish: Callable[[int, float], None],
    ) -> None:
        self.loop = loop
        self.gpus_per_node = gpus_per_node
        self.gpus = [
            SimGpu(g, g // gpus_per_node, pages_per_gpu, pages_per_gpu)
            for g in range(num_nodes * gpus_per_node)
        ]
        self.models = models
        self.costs = costs
        self.unified_memory = unified_memory
        self.host_caches = host_caches  # None: starts load as a plain engine (vanilla)
        self.load_tiers: list[str] = []  # "dram" / "ssd" per host-cache load, for metrics
        self.replicas: dict[int, SimReplica] = {}
        self.instances: dict[int, SimInstance] = {}
        self.starts: list[StartRecord] = []
        self.requests: dict[int, SimRequest] = {}
        self._devices: dict[tuple[int, ...], SharedDevice] = {}  # co-located instances' GPUs
        self.on_kv_pressure: Callable[[int], None] | None = None  # set by the driver
        self._on_first_token = on_first_token
        self._on_finish = on_finish
        # Layout (GPUs, replicas, instance set) and usage (KV in use) change at different rates;
        # snapshot parts are rebuilt only when their own version moved.
        self._layout_version = 0
        self._usage_version = 0
        self._snapshot: ClusterSnapshot | None = None
        self._snapshot_versions = (-1, -1)

    # ----- ClusterHandle ----------------------------------------------------------------
    def snapshot(self) -> ClusterSnapshot:
        versions = (self._layout_version, self._usage_version)
        if self._snapshot is None or self._snapshot_versions != versions:
            self._snapshot = self._build_snapshot(versions[0] != self._snapshot_versions[0])
            self._snapshot_versions = versions
        return self._snapshot

    def apply(self, actions: Sequence[Action]) -> None:
        for a in actions:
            if isinstance(a, Dispatch):
                self.instances[a.instance_id].add(self.requests[a.request_id])
            elif isinstance(a, StartInstance):
                self._start(a)
            elif isinstance(a, StopInstance):
                self._stop(a.instance_id)
            elif isinstance(a, Prewarm):
                self._prewarm(a)
            elif isinstance(a, Evict):
                self._evict(a.replica_id)
            elif isinstance(a, SetKvPages):
                self._set_kv(a.instance_id, a.kv_pages)
            else:  # pragma: no cover - the Action union is closed
                raise TypeError(f"unknown action {a!r}")
            if not isinstance(a, Dispatch):
                self._layout_version += 1

    def touch(self) -> None:
        """KV use changed: the next snapshot needs fresh instance views."""
        self._usage_version += 1

    # ----- instances --------------------------------------------------------------------
    def _start(self, a: StartInstance) -> None:
        m = self.models[a.model]
        pages = m.served.pages_per_gpu
        for g in a.gpus:
            assert a.colocate or not self.gpus[g].instance_ids, f"GPU {g} already serves"
        inst = SimInstance(
            a.instance_id,
            a.model,
            a.gpus,
            m.step_model,
            m.served.kv_bytes_per_token_per_gpu,
            self.loop,
            self._on_first_token,
            self._finished,
            self.touch,
            self._devices.setdefault(a.gpus, SharedDevice()) if a.colocate else None,
            self._kv_pressure,
        )
        now = self.loop.now()
        if a.replica_id is not None:
            rep = self.replicas[a.replica_id]
            assert rep.model == a.model and rep.gpus == a.gpus and rep.owner is None
            expected = StartPath.PREWARM_HIT if rep.is_ready else StartPath.INPROGRESS_HIT
            assert a.path == expected, f"start path {a.path} but replica is {expected}"
            for g in a.gpus:
                self.gpus[g].prewarm_pages -= pages
                self.gpus[g].weights_pages += pages
        elif self.unified_memory:
            # A miss loads weights into a slot on the critical path, like a prewarm.
            assert a.path == StartPath.COLD
            self._take_free(a.gpus, pages)
            rep = self._new_replica(-(a.instance_id + 1), a.model, a.gpus, pages)
        else:
            rep = None
            self._take_free(a.gpus, pages)
            self.loop.at(now + self._cold_start_s(a, m, now), self._ready, inst)
        inst.weights_pages = pages
        if rep is not None:
            rep.owner = a.instance_id
            inst.replica_id = rep.replica_id
            if rep.is_ready:
                self.loop.at(now + self._attach_s(), self._ready, inst)
        kv = min(self.gpus[g].free_pages for g in a.gpus)
        if a.kv_pages is not None:  # a static share (co-located instances split the memory)
            assert a.kv_pages <= kv, f"KV share {a.kv_pages} > {kv} free pages"
            kv = a.kv_pages
        for g in a.gpus:
            gpu = self.gpus[g]
            gpu.free_pages -= kv
            gpu.kv_pages += kv
            gpu.instance_ids.append(a.instance_id)
        inst.kv_pages = kv
        self.instances[a.instance_id] = inst
        self.starts.append(StartRecord(now, a.model, a.path))

    def _cold_start_s(self, a: StartInstance, m: SimModel, now: float) -> float:
        if self.host_caches is None:
            return m.vanilla_start_s
        cache = self.host_caches[self.gpus[a.gpus[0]].node_id]
        total = m.served.shard_bytes * m.served.tp
        load_s, tier = cache.load_s(a.model, total, m.served.shard_bytes, now)
        self.load_tiers.append(tier)
        return self.costs.serverless_engine_init_s + load_s

    def _kv_pressure(self, inst: SimInstance) -> None:
        if self.on_kv_pressure is not None and inst.instance_id in self.instances:
            self.on_kv_pressure(inst.instance_id)

    def _take_free(self, gpus: tuple[int, ...], pages: int) -> None:
        for g in gpus:
            gpu = self.gpus[g]
            assert gpu.free_pages >= pages, f"GPU {g}: {gpu.free_pages} free < {pages}"
            gpu.free_pages -= pages
            gpu.weights_pages += pages

    def _attach_s(self) -> float:
        return (
            self.costs.engine_attach_s
            + self.costs.kv_initial_map_bytes / self.costs.remap_bandwidth
        )

    def _ready(self, inst: SimInstance) -> None:
        if inst.state == InstanceState.STARTING and inst.instance_id in self.instances:
            inst.mark_ready()
            self._layout_version += 1

    def _stop(self, inst_id: int) -> None:
        inst = self.instances[inst_id]
        if inst.num_requests == 0:
            self._release(inst)
        else:
            inst.state = InstanceState.STOPPING

    def _finished(self, inst: SimInstance, req: SimRequest, now: float) -> None:
        del self.requests[req.request_id]
        self._on_finish(req.request_id, now)  # may dispatch more work here
        # Several requests can finish in one step: release once, after the first that empties it.
        released = inst.instance_id not in self.instances
        if inst.state == InstanceState.STOPPING and inst.num_requests == 0 and not released:
            self._release(inst)

    def _release(self, inst: SimInstance) -> None:
        """Drop the KV; keep the weights as a prewarmed replica under unified memory."""
        del self.instances[inst.instance_id]
        pages = inst.weights_pages
        for g in inst.gpus:
            gpu = self.gpus[g]
            gpu.free_pages += inst.kv_pages
            gpu.kv_pages -= inst.kv_pages
            gpu.weights_pages -= pages
            gpu.instance_ids.remove(inst.instance_id)
            if self.unified_memory:
                gpu.prewarm_pages += pages
            else:
                gpu.free_pages += pages
        if self.unified_memory:
            assert inst.replica_id is not None
            rep = self.replicas.pop(inst.replica_id)
            rep.owner = None
            rep.replica_id = -(inst.instance_id + 1)
            self.replicas[rep.replica_id] = rep
            for g in rep.gpus:  # keep queued shard loads pointing at the renamed replica
                gpu = self.gpus[g]
                gpu.load_queue = deque(
                    rep.replica_id if r == inst.replica_id else r for r in gpu.load_queue
                )
                if gpu.loading == inst.replica_id:
                    gpu.loading = rep.replica_id
        inst.state = InstanceState.STOPPING
        self._layout_version += 1

    def _set_kv(self, inst_id: int, kv_pages: int) -> None:
        inst = self.instances[inst_id]
        delta = kv_pages - inst.kv_pages
        assert kv_pages >= inst.kv_used_pages, "cannot lend pages in use"
        assert inst.kv_lent_pages - delta >= 0, "cannot reclaim more than was lent"
        for g in inst.gpus:
            gpu = self.gpus[g]
            assert gpu.free_pages >= delta, f"GPU {g} lacks {delta} free pages to reclaim"
            gpu.free_pages -= delta
            gpu.kv_pages += delta
        inst.kv_pages = kv_pages
        inst.kv_lent_pages -= delta
        if delta > 0:
            inst.kv_changed()

    # ----- prewarmed replicas -----------------------------------------------------------
    def _prewarm(self, a: Prewarm) -> None:
        m = self.models[a.model]
        pages = m.served.pages_per_gpu
        for g in a.gpus:
            gpu = self.gpus[g]
            assert gpu.free_pages >= pages, f"GPU {g}: {gpu.free_pages} free < {pages}"
            gpu.free_pages -= pages
            gpu.prewarm_pages += pages
        self._new_replica(a.replica_id, a.model, a.gpus, pages)

    def _new_replica(self, rid: int, model: str, gpus: tuple[int, ...], pages: int) -> SimReplica:
        assert rid not in self.replicas, f"replica id {rid} reused"
        rep = SimReplica(rid, model, gpus, pages, set(gpus))
        self.replicas[rid] = rep
        for g in gpus:
            gpu = self.gpus[g]
            gpu.load_queue.append(rid)
            if gpu.loading is None:
                self._start_next_load(gpu)
        return rep

    def _start_next_load(self, gpu: SimGpu) -> None:
        while gpu.load_queue:
            rid = gpu.load_queue.popleft()
            rep = self.replicas.get(rid)
            if rep is None:
                continue
            gpu.loading = rid
            gpu.load_token += 1
            duration = self.models[rep.model].prewarm_load_s
            self.loop.at(self.loop.now() + duration, self._shard_done, gpu, gpu.load_token)
            return
        gpu.loading = None

    def _shard_done(self, gpu: SimGpu, token: int) -> None:
        if token != gpu.load_token or gpu.loading is None:
            return  # cancelled
        rep = self.replicas[gpu.loading]
        rep.pending.discard(gpu.gpu_id)
        gpu.loading = None
        if rep.is_ready:
            self._layout_version += 1
            if rep.owner is not None:
                inst = self.instances[rep.owner]
                self.loop.at(self.loop.now() + self._attach_s(), self._ready, inst)
        self._start_next_load(gpu)

    def _evict(self, rid: int) -> None:
        rep = self.replicas.pop(rid)
        assert rep.owner is None, "cannot evict weights that are serving"
        for g in rep.gpus:
            gpu = self.gpus[g]
            gpu.prewarm_pages -= rep.pages_per_gpu
            gpu.free_pages += rep.pages_per_gpu
            if gpu.loading == rid:
                gpu.load_token += 1
                self._start_next_load(gpu)
            elif rid in gpu.load_queue:
                gpu.load_queue.remove(rid)

    # ----- views and checks -------------------------------------------------------------
    def _build_snapshot(self, layout_changed: bool) -> ClusterSnapshot:
        if layout_changed or self._snapshot is None:
            gpus = tuple(
                GpuView(
                    g.gpu_id,
                    g.node_id,
                    g.total_pages,
                    g.free_pages,
                    g.instance_ids[0] if g.instance_ids else None,
                )
                for g in self.gpus
            )
            replicas = tuple(
                ReplicaView(r.replica_id, r.model, r.gpus, r.pages_per_gpu, r.is_ready)
                for r in self.replicas.values()
                if r.owner is None
            )
        else:  # the same objects: consumers may test identity to skip work
            gpus, replicas = self._snapshot.gpus, self._snapshot.replicas
        instances = tuple(
            InstanceView(
                i.instance_id,
                i.model,
                i.gpus,
                i.state,
                i.kv_pages,
                i.kv_used_pages,
                i.kv_lent_pages,
            )
            for i in self.instances.values()
        )
        caches = self.host_caches or []
        return ClusterSnapshot(
            gpus,
            replicas,
            instances,
            self.gpus_per_node,
            tuple(frozenset(c.cached) for c in caches),
            tuple(c.ssd_busy_until_s for c in caches),
        )

    def check_invariants(self) -> None:
        """Pages conserved on every GPU, and every page's owner accounted for."""
        prewarm = [0] * len(self.gpus)
        weights = [0] * len(self.gpus)
        models_on: list[set[str]] = [set() for _ in self.gpus]
        for r in self.replicas.values():
            for g in r.gpus:
                (weights if r.owner is not None else prewarm)[g] += r.pages_per_gpu
                assert r.model not in models_on[g], f"two replicas of {r.model} on GPU {g}"
                models_on[g].add(r.model)
        for inst in self.instances.values():
            if inst.replica_id is None:
                for g in inst.gpus:
                    weights[g] += inst.weights_pages
            used = inst.kv_used_pages
            assert 0 <= used <= inst.kv_pages and inst.kv_lent_pages >= 0
            for g in inst.gpus:
                assert inst.instance_id in self.gpus[g].instance_ids
        for g in self.gpus:
            assert min(g.free_pages, g.prewarm_pages, g.weights_pages, g.kv_pages) >= 0
            total = g.free_pages + g.prewarm_pages + g.weights_pages + g.kv_pages
            assert total == g.total_pages, f"GPU {g.gpu_id}: {total} pages != {g.total_pages}"
            assert g.prewarm_pages == prewarm[g.gpu_id], f"GPU {g.gpu_id} prewarm books"
            assert g.weights_pages == weights[g.gpu_id], f"GPU {g.gpu_id} weight books"
            kv = sum(self.instances[i].kv_pages for i in g.instance_ids)
            assert g.kv_pages == kv, f"GPU {g.gpu_id}: KV books {g.kv_pages} != {kv}"
