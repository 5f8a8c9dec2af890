"""`ClusterHandle` over real universal workers: the shared books, and their effects as commands.

The books (`warmserve.cluster.books`) change synchronously in `apply`, as the controller's
contract asks; each effect becomes a command on its worker's ordered pipe. The physical work
finishes later and comes back as worker events (`mark_loaded`, `mark_running`, ...), which
update the books. One worker is one device; a dead worker's device is out of the snapshot
until its replacement reports ready.

A TP instance spans the workers of one node that the controller chose (the planner's nested
groups): every effect goes to each of them, each with its rank; requests go to the first,
the leader. It runs once every rank has reported its engine up, and a KV resize is relayed
between the ranks (`GroupKv`) as each finishes its part.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from warmserve.cluster.books import Books, DeviceBook, InstanceBook, ReplicaBook
from warmserve.cluster.effects import (
    Activate,
    Deactivate,
    DropWeights,
    Effect,
    LoadWeights,
    ResizeKv,
    Route,
)
from warmserve.cluster.reads import BookReads
from warmserve.control.api import Action, StartInstance
from warmserve.engine.request import SamplingParams
from warmserve.hardware import PAGE_BYTES
from warmserve.runtime import messages as m
from warmserve.types import InstanceId, ReplicaId, RequestId, StartPath


@dataclass(frozen=True, slots=True)
class ModelFiles:
    name: str
    model_dir: str
    weight_pages: int  # per worker: one TP shard's
    tp: int = 1


@dataclass(slots=True)
class EngineKv:
    """An instance's KV cache as its engine reports it."""

    blocks: int
    block_bytes: int
    used_blocks: int = 0


class RuntimeCluster(BookReads):
    def __init__(
        self,
        num_workers: int,
        models: dict[str, ModelFiles],
        send: Callable[[int, m.Command], None],
        on_dispatch: Callable[[RequestId, InstanceId], None],
        page_bytes: int = PAGE_BYTES,
        payload: Callable[[RequestId], tuple[tuple[int, ...], SamplingParams]] | None = None,
        workers_per_node: int | None = None,
    ) -> None:
        """`on_dispatch(request, instance)`: a request was routed (after its `AddRequest`
        went out, when `payload` gives each request's prompt and sampling parameters).
        `workers_per_node`: workers are numbered node by node (default: one node)."""
        weights = {name: f.weight_pages for name, f in models.items()}
        per_node = workers_per_node or num_workers
        # Every worker is one device on its own; none is up until it reports ready.
        self.books = Books(num_workers, per_node, weights, alive=False, page_bytes=page_bytes)
        self.per_node = per_node
        # TP instances starting: the ranks whose engine is not up yet.
        self._activating: dict[InstanceId, set[int]] = {}
        self._group_kv: dict[InstanceId, list[int]] = {}  # KV resizes each rank finished
        self.models = models
        self.starts: list[tuple[str, StartPath]] = []
        self.engine_kv: dict[InstanceId, EngineKv] = {}
        self._send = send
        self._on_dispatch = on_dispatch
        self._payload = payload

    @property
    def devices(self) -> list[DeviceBook]:
        return self.books.devices

    @property
    def replicas(self) -> dict[ReplicaId, ReplicaBook]:
        return self.books.replicas

    @property
    def instances(self) -> dict[InstanceId, InstanceBook]:
        return self.books.instances

    # ----- ClusterHandle: reads from BookReads -------------------------------------------
    def apply(self, actions: Sequence[Action]) -> None:
        for a in actions:
            if isinstance(a, StartInstance) and a.colocate:
                raise NotImplementedError("the serving runtime runs one model per worker")
            if isinstance(a, StartInstance) and len(a.gpus) != self.models[a.model].tp:
                raise ValueError(f"{a.model} runs at TP {self.models[a.model].tp}, not {a.gpus}")
        for e in self.books.apply(actions):
            if isinstance(e, Route):
                if self._payload is not None:
                    leader = self.books.instances[e.instance_id].devices[0]
                    self._send(leader, m.AddRequest(e.request_id, *self._payload(e.request_id)))
                self._on_dispatch(e.request_id, e.instance_id)
                continue
            for rank, wid in enumerate(e.devices):
                self._effect(e, rank, wid)

    def _effect(self, e: Effect, rank: int, wid: int) -> None:
        """One worker's part of an effect: rank `rank` of the effect's devices."""
        size = len(e.devices)
        if isinstance(e, Activate):
            if rank == 0:
                self.starts.append((e.model, e.path))
            cmd = m.Activate(e.model, self.models[e.model].model_dir, e.instance_id)
            if size > 1:
                kv = self.books.instances[e.instance_id].kv_pages
                group = tuple(self.node_rank(d) for d in e.devices)
                cmd = dataclasses.replace(cmd, group=group, rank=rank, kv_pages=kv)
                self._activating.setdefault(e.instance_id, set()).add(wid)
                self._group_kv[e.instance_id] = [0] * size
            self._send(wid, cmd)
        elif isinstance(e, Deactivate):
            self.engine_kv.pop(e.instance_id, None)
            self._activating.pop(e.instance_id, None)
            self._group_kv.pop(e.instance_id, None)
            self._send(wid, m.Deactivate(keep_weights=e.keep_weights))
            if e.kept_serial is not None:
                # The pipe is ordered: whatever the worker runs next finds them resident.
                self.books.mark_loaded(e.kept_serial, wid)
        elif isinstance(e, LoadWeights):
            if not e.for_activation:  # otherwise the Activate that follows loads them
                files = self.models[e.model]
                self._send(wid, m.LoadModel(e.model, files.model_dir, e.serial, rank, size))
        elif isinstance(e, DropWeights):
            self._send(wid, m.UnloadModel(e.model))
        elif isinstance(e, ResizeKv):
            self._send(wid, m.MapKvPages(e.kv_pages))
        else:  # pragma: no cover - the Effect union is closed
            raise TypeError(f"unknown effect {e!r}")

    def node_rank(self, wid: int) -> int:
        """A worker's index among its node's workers (the rank in the node's TP world)."""
        return wid % self.per_node

    def request_done(self, request_id: RequestId, inst_id: InstanceId) -> None:
        """Before the controller hears of it: it may then release a drained instance."""
        self.books.request_done(inst_id, request_id)

    # ----- events from workers ----------------------------------------------------------
    def worker_ready(self, wid: int, num_pages: int) -> None:
        self.books.device_ready(wid, num_pages)

    def mark_loaded(self, wid: int, token: int) -> None:
        self.books.mark_loaded(token, wid)

    def mark_running(
        self, wid: int, kv_blocks: int, block_bytes: int, instance_id: InstanceId | None = None
    ) -> InstanceBook | None:
        """The worker's engine is up. `instance_id`: the one it was activated for; an echo
        that arrives after that instance was released is not taken for the next one."""
        inst_id = self.books.devices[wid].instance_id
        if inst_id is None or (instance_id is not None and inst_id != instance_id):
            return None
        inst = self.books.instances.get(inst_id)
        if inst is None:
            return None
        if inst.devices[0] == wid:  # the leader's blocks are the instance's
            self.engine_kv[inst_id] = EngineKv(kv_blocks, block_bytes)
        waiting = self._activating.get(inst_id)
        if waiting is not None:
            waiting.discard(wid)
            if waiting:
                return None  # another rank's engine is not up yet
            del self._activating[inst_id]
        return self.books.mark_running(inst_id)

    def kv_mapped(self, wid: int, instance_id: InstanceId, done: int) -> None:
        """A rank of a TP instance finished its `done`-th KV resize: tell every rank where
        all stand."""
        inst = self.books.instances.get(instance_id)
        group = self._group_kv.get(instance_id)
        if inst is None or group is None or wid not in inst.devices:
            return
        group[inst.devices.index(wid)] = done
        for d in inst.devices:
            self._send(d, m.GroupKv(instance_id, tuple(group)))

    def mark_kv_used(self, wid: int, used_blocks: int) -> InstanceBook | None:
        inst_id = self.books.devices[wid].instance_id
        inst = self.books.instances.get(inst_id) if inst_id is not None else None
        kv = self.engine_kv.get(inst_id) if inst_id is not None else None
        if inst is not None and kv is not None and kv.used_blocks != used_blocks:
            kv.used_blocks = used_blocks
            used = -(-used_blocks * kv.block_bytes // self.page_bytes)
            self.books.set_kv_used(inst.instance_id, min(inst.kv_pages, used))
        return inst

    def worker_lost(self, wid: int) -> InstanceId | None:
        """Forget everything on a dead worker; the instance it ran, if any."""
        lost = self.books.device_lost(wid)
        for inst_id in lost:
            self.engine_kv.pop(inst_id, None)
            self._activating.pop(inst_id, None)
            self._group_kv.pop(inst_id, None)
        return lost[0] if lost else None

    def check(self) -> None:
        self.books.check_invariants()
