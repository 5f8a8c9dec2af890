"""`ClusterHandle` over real universal workers: the runtime's page books and action routing.

The books change synchronously in `apply` (the controller's contract), and each action turns
into commands on its worker's ordered pipe; the physical work finishes later and comes back
as events (`mark_loaded`, `mark_running`). One worker is one device here (TP = 1); a dead
worker's device is out of the snapshot until its replacement reports ready.
"""

from __future__ import annotations

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
    SetKvPages,
    StartInstance,
    StopInstance,
)
from warmserve.runtime import messages as m
from warmserve.types import InstanceId, InstanceState, ReplicaId, RequestId, StartPath

DEAD = -1  # GpuView.instance_id of a device that is down: nothing is placed on it


@dataclass(slots=True)
class DeviceBook:
    worker_id: int
    total_pages: int = 0
    free_pages: int = 0
    alive: bool = False
    instance_id: InstanceId | None = None


@dataclass(slots=True)
class ReplicaBook:
    replica_id: ReplicaId
    model: str
    worker_id: int
    pages: int
    token: int  # matches the worker's `Loaded`
    ready: bool = False
    owner: InstanceId | None = None


@dataclass(slots=True)
class InstanceBook:
    instance_id: InstanceId
    model: str
    worker_id: int
    path: StartPath
    replica_id: ReplicaId | None
    weight_pages: int
    kv_pages: int  # mapped in its KV slot (per the books)
    kv_lent_pages: int = 0
    state: InstanceState = InstanceState.STARTING
    requests: set[RequestId] = field(default_factory=set)
    kv_blocks: int = 0
    kv_used_blocks: int = 0
    block_bytes: int = 0
    page_bytes: int = 0


@dataclass(frozen=True, slots=True)
class ModelFiles:
    name: str
    model_dir: str
    weight_pages: int


class RuntimeCluster:
    def __init__(
        self,
        num_workers: int,
        models: dict[str, ModelFiles],
        unified_memory: bool,
        send: Callable[[int, m.Command], None],
        on_dispatch: Callable[[RequestId, InstanceId], None],
    ) -> None:
        self.devices = [DeviceBook(w) for w in range(num_workers)]
        self.models = models
        self.unified_memory = unified_memory  # keep weights as a replica when an instance stops
        self.replicas: dict[ReplicaId, ReplicaBook] = {}
        self.instances: dict[InstanceId, InstanceBook] = {}
        self.starts: list[tuple[str, StartPath]] = []
        self._send = send
        self._on_dispatch = on_dispatch
        self._next_token = 0
        self._version = 0
        self._snapshot: tuple[int, ClusterSnapshot] | None = None

    # ----- ClusterHandle ----------------------------------------------------------------
    def snapshot(self) -> ClusterSnapshot:
        if self._snapshot is not None and self._snapshot[0] == self._version:
            return self._snapshot[1]
        gpus = tuple(
            GpuView(d.worker_id, 0, d.total_pages, d.free_pages, d.instance_id if d.alive else DEAD)
            for d in self.devices
        )
        replicas = tuple(
            ReplicaView(r.replica_id, r.model, (r.worker_id,), r.pages, r.ready)
            for r in self.replicas.values()
            if r.owner is None
        )
        instances = tuple(
            InstanceView(
                i.instance_id,
                i.model,
                (i.worker_id,),
                i.state,
                i.kv_pages,
                self._kv_used_pages(i),
                i.kv_lent_pages,
            )
            for i in self.instances.values()
        )
        snap = ClusterSnapshot(gpus, replicas, instances, gpus_per_node=len(self.devices))
        self._snapshot = (self._version, snap)
        return snap

    def apply(self, actions: Sequence[Action]) -> None:
        for a in actions:
            if isinstance(a, Dispatch):
                self.instances[a.instance_id].requests.add(a.request_id)
                self._on_dispatch(a.request_id, a.instance_id)
                continue
            if isinstance(a, StartInstance):
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
            self._version += 1

    # ----- actions ----------------------------------------------------------------------
    def _start(self, a: StartInstance) -> None:
        if len(a.gpus) != 1 or a.colocate:
            raise NotImplementedError("the serving runtime runs one model per worker (TP = 1)")
        wid = a.gpus[0]
        dev = self.devices[wid]
        assert dev.alive and dev.instance_id is None, f"worker {wid} is busy or down"
        files = self.models[a.model]
        if a.replica_id is not None:
            rep = self.replicas[a.replica_id]
            assert rep.model == a.model and rep.worker_id == wid and rep.owner is None
            rep.owner = a.instance_id
        else:
            assert dev.free_pages >= files.weight_pages, f"worker {wid}: no room for weights"
            dev.free_pages -= files.weight_pages
            if self.unified_memory:  # a miss loads into a slot, like a prewarm
                rep = self._new_replica(-(a.instance_id + 1), a.model, wid, files.weight_pages)
                rep.owner = a.instance_id
        inst = InstanceBook(
            a.instance_id, a.model, wid, a.path, a.replica_id, files.weight_pages, dev.free_pages
        )
        if self.unified_memory and a.replica_id is None:
            inst.replica_id = -(a.instance_id + 1)
        dev.free_pages = 0  # the KV cache grows over every free page
        dev.instance_id = a.instance_id
        self.instances[a.instance_id] = inst
        self.starts.append((a.model, a.path))
        self._send(wid, m.Activate(a.model, files.model_dir))

    def _stop(self, inst_id: InstanceId) -> None:
        inst = self.instances[inst_id]
        if inst.requests:
            inst.state = InstanceState.STOPPING  # drains; released by `request_done`
        else:
            self._release(inst)

    def request_done(self, request_id: RequestId, inst_id: InstanceId) -> None:
        """After the controller heard of it: release a stopping instance that emptied."""
        inst = self.instances.get(inst_id)
        if inst is None:
            return
        inst.requests.discard(request_id)
        if inst.state == InstanceState.STOPPING and not inst.requests:
            self._release(inst)
            self._version += 1

    def _release(self, inst: InstanceBook) -> None:
        del self.instances[inst.instance_id]
        dev = self.devices[inst.worker_id]
        dev.instance_id = None
        dev.free_pages += inst.kv_pages
        if self.unified_memory:
            assert inst.replica_id is not None
            rep = self.replicas.pop(inst.replica_id)
            rep.owner = None
            rep.ready = True
            rep.replica_id = -(inst.instance_id + 1) if rep.replica_id >= 0 else rep.replica_id
            self.replicas[rep.replica_id] = rep
        else:
            dev.free_pages += inst.weight_pages
        self._send(inst.worker_id, m.Deactivate(keep_weights=self.unified_memory))

    def _set_kv(self, inst_id: InstanceId, kv_pages: int) -> None:
        """Lend (the difference becomes free pages for prewarming) or reclaim KV pages."""
        inst = self.instances[inst_id]
        delta = kv_pages - inst.kv_pages
        dev = self.devices[inst.worker_id]
        assert inst.kv_lent_pages - delta >= 0, "cannot reclaim more than was lent"
        assert dev.free_pages >= delta, f"worker {inst.worker_id}: no free pages to reclaim"
        assert kv_pages >= 1, "an instance keeps at least one KV page"
        dev.free_pages -= delta
        inst.kv_pages = kv_pages
        inst.kv_lent_pages -= delta
        self._send(inst.worker_id, m.SetKvPages(kv_pages))

    def _prewarm(self, a: Prewarm) -> None:
        (wid,) = a.gpus
        dev = self.devices[wid]
        pages = self.models[a.model].weight_pages
        assert dev.alive and dev.free_pages >= pages, f"worker {wid}: no room to prewarm"
        dev.free_pages -= pages
        rep = self._new_replica(a.replica_id, a.model, wid, pages)
        self._send(wid, m.Prewarm(a.model, self.models[a.model].model_dir, rep.token))

    def _new_replica(self, rid: ReplicaId, model: str, wid: int, pages: int) -> ReplicaBook:
        assert rid not in self.replicas, f"replica id {rid} reused"
        self._next_token += 1
        rep = ReplicaBook(rid, model, wid, pages, self._next_token)
        self.replicas[rid] = rep
        return rep

    def _evict(self, rid: ReplicaId) -> None:
        rep = self.replicas.pop(rid)
        assert rep.owner is None, "cannot evict weights that are serving"
        self.devices[rep.worker_id].free_pages += rep.pages
        self._send(rep.worker_id, m.Evict(rep.model))

    # ----- events from workers ----------------------------------------------------------
    def worker_ready(self, wid: int, num_pages: int) -> None:
        dev = self.devices[wid]
        dev.total_pages = dev.free_pages = num_pages
        dev.alive, dev.instance_id = True, None
        self._version += 1

    def mark_loaded(self, wid: int, token: int) -> None:
        for rep in self.replicas.values():
            if rep.worker_id == wid and rep.token == token:
                rep.ready = True
                self._version += 1
                return

    def mark_running(
        self, wid: int, kv_blocks: int, block_bytes: int = 0, page_bytes: int = 0
    ) -> InstanceBook | None:
        inst_id = self.devices[wid].instance_id
        inst = self.instances.get(inst_id) if inst_id is not None else None
        if inst is None:
            return None
        if inst.replica_id is not None:
            self.replicas[inst.replica_id].ready = True
        if inst.state == InstanceState.STARTING:
            inst.state = InstanceState.RUNNING
        inst.kv_blocks, inst.block_bytes, inst.page_bytes = kv_blocks, block_bytes, page_bytes
        self._version += 1
        return inst

    def mark_kv_used(self, wid: int, used_blocks: int) -> InstanceBook | None:
        inst_id = self.devices[wid].instance_id
        inst = self.instances.get(inst_id) if inst_id is not None else None
        if inst is not None and inst.kv_used_blocks != used_blocks:
            inst.kv_used_blocks = used_blocks
            self._version += 1
        return inst

    def worker_lost(self, wid: int) -> InstanceId | None:
        """Forget everything on a dead worker; the instance it ran, if any."""
        dev = self.devices[wid]
        lost = dev.instance_id
        dev.alive, dev.instance_id, dev.free_pages, dev.total_pages = False, None, 0, 0
        for rid in [r for r, rep in self.replicas.items() if rep.worker_id == wid]:
            del self.replicas[rid]
        if lost is not None:
            self.instances.pop(lost, None)
        self._version += 1
        return lost

    def _kv_used_pages(self, inst: InstanceBook) -> int:
        if not inst.page_bytes:
            return 0
        return min(inst.kv_pages, -(-inst.kv_used_blocks * inst.block_bytes // inst.page_bytes))

    # ----- checks -----------------------------------------------------------------------
    def check(self) -> None:
        for dev in self.devices:
            if not dev.alive:
                continue
            wid = dev.worker_id
            weights = sum(r.pages for r in self.replicas.values() if r.worker_id == wid)
            kv = 0
            for inst in self.instances.values():
                if inst.worker_id == wid:
                    kv += inst.kv_pages
                    if inst.replica_id is None:
                        weights += inst.weight_pages
            total = dev.free_pages + weights + kv
            assert total == dev.total_pages, f"worker {wid}: {total} != {dev.total_pages} pages"
